"""unshuffle_tokens: forward and every gradient against the official decoder input
(mae_fast.reference.decoder_input) in float64 and in the same dtype, odd and real shapes, fp32 and bf16,
mixed dtypes, the round trip with gather_tokens, the Triton kernels, bad inputs; real sizes on a GPU."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_fast import ops, reference
from mae_fast.testing import assert_close_to_oracle, check_op, randn, random_ids, ULP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_copy_is_exact(dtype, idtype):
    N, L, K, D = 3, 50, 12, 72
    x = randn(N, 1 + K, D, dtype=dtype)
    mt = randn(1, 1, D, dtype=dtype, seed=1)
    _, ids_restore = random_ids(N, L, K, idtype)
    out = ops.unshuffle_tokens(x, ids_restore, mt)
    assert out.shape == (N, 1 + L, D) and out.dtype == dtype
    assert torch.equal(out, reference.decoder_input(x, ids_restore, mt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 50, 12, 72, 1), (2, 196, 49, 512, 1), (2, 49, 12, 40, 0), (4, 9, 0, 8, 2),
                                   (19, 6, 2, 1024, 1), (2, 9, 3, 300, 1)])
def test_against_oracle(dtype, shape):
    N, L, K, D, P = shape
    x = randn(N, P + K, D, dtype=dtype)
    mt = randn(1, 1, D, dtype=dtype, seed=1)
    pos = randn(1, P + L, D, dtype=dtype, seed=2)
    _, ids_restore = random_ids(N, L, K, torch.int32 if D % 2 else torch.int64, seed=3)
    g = randn(N, P + L, D, dtype=dtype, seed=4)
    check_op(lambda x, ids, mt, pos: ops.unshuffle_tokens(x, ids, mt, pos, num_prefix=P),
             lambda x, ids, mt, pos: reference.decoder_input(x, ids, mt, pos, P),
             [x, ids_restore, mt, pos], g, name="unshuffle_tokens")


def test_mixed_dtypes_and_1d_mask_token():
    """bf16 x with fp32 parameters (autocast style): output bf16, grads in each parameter's dtype."""
    N, L, K, D = 3, 50, 12, 72
    x = randn(N, 1 + K, D, dtype=torch.bfloat16).requires_grad_(True)
    mt = randn(D, seed=1).requires_grad_(True)
    pos = randn(1, 1 + L, D, seed=2).requires_grad_(True)
    _, ids_restore = random_ids(N, L, K)
    out = ops.unshuffle_tokens(x, ids_restore, mt, pos)
    assert out.dtype == torch.bfloat16
    exact = reference.decoder_input(x.double(), ids_restore, mt.double(), pos.double())
    assert_close_to_oracle(out, exact, exact.to(torch.bfloat16), rtol=ULP[torch.bfloat16], name="mixed out")
    g = randn(N, 1 + L, D, dtype=torch.bfloat16, seed=3)
    out.backward(g)
    assert mt.grad.shape == (D,) and mt.grad.dtype == torch.float32
    assert pos.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    removed = (ids_restore >= K).unsqueeze(-1)  # [N, L, 1]
    assert torch.allclose(mt.grad.double(), (g[:, 1:].double() * removed).sum((0, 1)), atol=1e-5)
    assert torch.allclose(pos.grad.double(), g.double().sum(0, keepdim=True), atol=1e-5)


def test_only_mask_token_grad():
    N, L, K, D = 3, 50, 12, 72
    mt = randn(1, 1, D, seed=1).requires_grad_(True)
    _, ids_restore = random_ids(N, L, K)
    g = randn(N, 1 + L, D, seed=2)
    ops.unshuffle_tokens(randn(N, 1 + K, D), ids_restore, mt, randn(1, 1 + L, D, seed=3)).backward(g)
    removed = (ids_restore >= K).unsqueeze(-1)  # [N, L, 1]
    assert torch.allclose(mt.grad[0, 0].double(), (g[:, 1:].double() * removed).sum((0, 1)), atol=1e-5)


def test_round_trip_gather_then_unshuffle():
    """unshuffle(gather(x)) puts every kept token back in place and the mask token everywhere else."""
    N, L, K, D = 4, 50, 13, 24
    x = randn(N, L, D)
    pre = randn(1, 1, D, seed=1)
    mt = randn(1, 1, D, seed=2)
    ids_keep, ids_restore = random_ids(N, L, K, seed=9)
    out = ops.unshuffle_tokens(ops.gather_tokens(x, ids_keep, prefix=pre), ids_restore, mt)  # [N, 1+L, D]
    kept = (ids_restore < K).unsqueeze(-1)  # [N, L, 1]
    assert torch.equal(out[:, 1:], torch.where(kept, x, mt.expand(N, L, D)))
    assert torch.equal(out[:, 0], pre[0, 0].expand(N, D))


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 4), L=st.integers(1, 20), kf=st.floats(0, 1), D=st.integers(1, 40), P=st.integers(0, 2),
       i32=st.booleans(), seed=st.integers(0, 1000))
def test_round_trip_property(N, L, kf, D, P, i32, seed):
    """Any shape: gather equals the reference exactly; unshuffle(gather(x)) restores the kept tokens."""
    K = int(kf * L)
    x = randn(N, L, D, seed=seed)
    pre = randn(1, P, D, seed=seed + 1) if P else None
    mt = randn(1, 1, D, seed=seed + 2)
    ids_keep, ids_restore = random_ids(N, L, K, torch.int32 if i32 else torch.int64, seed=seed)
    y = ops.gather_tokens(x, ids_keep, prefix=pre)  # [N, P+K, D]
    assert torch.equal(y, reference.gather_visible(x, ids_keep, prefix=pre))
    out = ops.unshuffle_tokens(y, ids_restore, mt, num_prefix=P)  # [N, P+L, D]
    kept = (ids_restore < K).unsqueeze(-1)  # [N, L, 1]
    assert torch.equal(out[:, P:], torch.where(kept, x, mt.expand(N, L, D)))


def test_triton_kernels_run(triton_path):
    N, L, K, D = 2, 16, 4, 8
    x = randn(N, 1 + K, D)
    mt = randn(1, 1, D, seed=1)
    pos = randn(1, 1 + L, D, seed=2)
    _, ids_restore = random_ids(N, L, K)
    g = randn(N, 1 + L, D, seed=3)
    check_op(ops.unshuffle_tokens, reference.decoder_input, [x, ids_restore, mt, pos], g, name="triton path")


def test_bad_inputs():
    N, L, K, D = 2, 10, 3, 8
    _, ids_restore = random_ids(N, L, K)
    y = randn(N, 1 + K, D)
    with pytest.raises(ValueError, match="mask_token must have shape"):
        ops.unshuffle_tokens(y, ids_restore, randn(1, 1, D + 1))
    with pytest.raises(ValueError, match=r"mask_token must have shape \[1, 1, 1\] .* got \[\]"):
        ops.unshuffle_tokens(randn(N, 1 + K, 1), ids_restore, torch.tensor(1.0))  # 0-d: not an IndexError
    with pytest.raises(TypeError, match="mask_token must be a torch.Tensor"):
        ops.unshuffle_tokens(y, ids_restore, None)
    with pytest.raises(TypeError, match="ids_restore must have dtype"):
        ops.unshuffle_tokens(y, ids_restore.to(torch.int16), randn(1, 1, D))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        ops.unshuffle_tokens(y, ids_restore, randn(1, 1, D), randn(1, L, D))
    with pytest.raises(ValueError, match="ids_restore has only"):
        ops.unshuffle_tokens(randn(N, L + 2, D), ids_restore, randn(1, 1, D))
    with pytest.raises(ValueError, match="num_prefix"):
        ops.unshuffle_tokens(y, ids_restore, randn(1, 1, D), num_prefix=-1)
    bad = ids_restore.clone()
    bad[:, 0] = bad[:, 1]
    with pytest.raises(ValueError, match="permutations"):
        ops.unshuffle_tokens(y, bad, randn(1, 1, D), check_indices=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [72, 512, 1024])
def test_gpu_real_sizes(dtype, D):
    N, L, K = 16, 196, 49
    _, ids_restore = random_ids(N, L, K, device="cuda")
    y = randn(N, 1 + K, D, dtype=dtype, device="cuda")
    mt = randn(1, 1, D, dtype=dtype, seed=4, device="cuda")
    dpos = randn(1, 1 + L, D, dtype=dtype, seed=5, device="cuda")
    g = randn(N, 1 + L, D, dtype=dtype, seed=6, device="cuda")
    check_op(ops.unshuffle_tokens, reference.decoder_input, [y, ids_restore, mt, dpos], g, name="gpu unshuffle")


@pytest.mark.gpu
def test_gpu_backward_deterministic():
    N, L, K, D = 256, 196, 49, 512
    _, ids_restore = random_ids(N, L, K, device="cuda")
    y = randn(N, 1 + K, D, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    mt = randn(1, 1, D, device="cuda").requires_grad_(True)
    dpos = randn(1, 1 + L, D, device="cuda").requires_grad_(True)
    g = randn(N, 1 + L, D, dtype=torch.bfloat16, seed=1, device="cuda")
    res = []
    for _ in range(2):
        mt.grad = dpos.grad = y.grad = None
        ops.unshuffle_tokens(y, ids_restore, mt, dpos).backward(g)
        res.append((mt.grad.clone(), dpos.grad.clone(), y.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N*(1+L)*D > 2**31 elements: output rows past the int32 range are written correctly."""
    N, L, K, D = 11000, 196, 4, 1024
    _, ids_restore = random_ids(N, L, K, device="cuda")
    y = randn(N, 1 + K, D, dtype=torch.bfloat16, device="cuda")
    mt = randn(1, 1, D, dtype=torch.bfloat16, seed=1, device="cuda")
    z = ops.unshuffle_tokens(y, ids_restore, mt)  # [N, 1+L, D], 2.2e9 elements
    assert torch.equal(z[-4:], reference.decoder_input(y[-4:], ids_restore[-4:], mt))
