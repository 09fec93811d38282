"""Number arguments of every public entry point: each takes the forms the model takes (a Python number, a
numpy scalar, a 0-d tensor) and refuses anything else with a TypeError/ValueError that names the argument
(never ``float()``'s own message), as ``mae_fast.ops._checks`` does."""
import numpy as np
import pytest
import torch

from mae_fast import ops
from mae_fast.testing import randn, random_ids

REALS = [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)]
INTS = [2, np.int64(2), np.int32(2), torch.tensor(2)]
NOT_NUMBERS = [None, "abc", [0.5], torch.tensor([0.5]), True]


def _x():
    return randn(2, 3, 8)


IMGS, IDS, RESTORE = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)), *random_ids(2, 6, 3)


def _seeded(fn):
    """fn run right after torch.manual_seed(0): the same draw on every call."""
    torch.manual_seed(0)
    return fn()


FLOAT_ARGS = {  # name -> call(value) with the argument set to value (one that gives 0.5 or 2 a meaning)
    "add_layer_norm eps": ("eps", lambda v: ops.add_layer_norm(_x(), None, None, v)),
    "self_attention dropout_p": ("dropout_p", lambda v: (torch.manual_seed(0), ops.self_attention(
        _x(), randn(24, 8), None, 2, dropout_p=v, backend="math"))[1]),
    "self_attention scale": ("scale", lambda v: ops.self_attention(_x(), randn(24, 8), None, 2, scale=v,
                                                                  backend="math")),
    "qkv_attention scale": ("scale", lambda v: ops.qkv_attention(randn(2, 3, 24), 2, scale=v)),
    "norm_pix_loss eps": ("eps", lambda v: ops.norm_pix_loss(randn(2, 6, 48), IMGS, torch.ones(2, 6), 4, eps=v)),
    "random_masking mask_ratio": ("mask_ratio", lambda v: _seeded(lambda: ops.random_masking(2, 8, v).mask)),
}
INT_ARGS = {
    "self_attention num_heads": ("num_heads", lambda v: ops.self_attention(_x(), randn(24, 8), None, v,
                                                                          backend="math")),
    "qkv_attention num_heads": ("num_heads", lambda v: ops.qkv_attention(randn(2, 3, 24), v)),
    "unshuffle_tokens num_prefix": ("num_prefix", lambda v: ops.unshuffle_tokens(randn(2, 5, 8), RESTORE,
                                                                                torch.zeros(8), num_prefix=v)),
    "gather_patches patch_size": ("patch_size", lambda v: ops.gather_patches(IMGS[..., :4, :6], IDS, v)),
    "norm_pix_loss patch_size": ("patch_size", lambda v: ops.norm_pix_loss(randn(2, 6, 12), IMGS[..., :4, :6],
                                                                          torch.ones(2, 6), v)),
    "random_masking frames": ("frames", lambda v: _seeded(lambda: ops.random_masking(2, 8, 0.5,
                                                                                            frames=v).mask)),
}


@pytest.mark.parametrize("value", REALS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("case", list(FLOAT_ARGS))
def test_real_number_forms(case, value):
    name, call = FLOAT_ARGS[case]
    torch.testing.assert_close(call(value), call(0.5))


@pytest.mark.parametrize("case,value", [(c, v) for c in FLOAT_ARGS for v in NOT_NUMBERS
                                        if not (c.endswith("attention scale") and v is None)],  # None: the default
                         ids=repr)
def test_not_a_real_number_names_the_argument(case, value):
    name, call = FLOAT_ARGS[case]
    with pytest.raises((TypeError, ValueError), match=f"^{name} must be"):
        call(value)


@pytest.mark.parametrize("value", INTS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("case", list(INT_ARGS))
def test_int_forms(case, value):
    name, call = INT_ARGS[case]
    a, b = call(value), call(2)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y) or torch.allclose(x, y)


@pytest.mark.parametrize("value", NOT_NUMBERS + [2.0, np.float32(2.0), torch.tensor(2.0)], ids=repr)
@pytest.mark.parametrize("case", list(INT_ARGS))
def test_not_an_int_names_the_argument(case, value):
    name, call = INT_ARGS[case]
    with pytest.raises((TypeError, ValueError), match=f"^{name} must be"):
        call(value)


@pytest.mark.parametrize("case,value,msg", [
    ("add_layer_norm eps", -1.0, "eps must be >= 0"),
    ("add_layer_norm eps", float("nan"), "eps must be >= 0"),
    ("self_attention dropout_p", 2.0, r"dropout_p must be in \[0, 1\)"),
    ("random_masking mask_ratio", 1.0, r"mask_ratio must be in \[0, 1\)"),
])
def test_out_of_range_names_the_argument(case, value, msg):
    with pytest.raises(ValueError, match=msg):
        FLOAT_ARGS[case][1](value)


def test_residual_add_of_zero_dim_tensors():
    with pytest.raises(ValueError, match=r"s must have at least 1 dim \(\[\.\.\., D\]\), got shape \[\]"):
        ops.residual_add(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"branch must have s's shape \[2, 3\], got \[3\]"):
        ops.residual_add(randn(2, 3), randn(3))
