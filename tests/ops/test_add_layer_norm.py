"""add_layer_norm: forward and every gradient against torch (x + branch + bias, then F.layer_norm) in float64
and in the same dtype; fp32, the autocast layout (fp32 stream, bf16 branch and output) and bf16; odd widths
and row counts; without a branch (s is x: the residual gradient joins in the same pass); the Triton kernels;
the registered ops; bad inputs; real sizes on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.kernels import _launch
from mae_fast.testing import check_op, randn

BF16 = torch.bfloat16


def oracle(x, w, b, branch, branch_bias, eps=1e-6, out_dtype=None):
    """(y, s) the plain way; y cast to out_dtype and back (what a consumer in that dtype sees)."""
    s = x if branch is None else x + branch.to(x.dtype) + (0 if branch_bias is None else branch_bias.to(x.dtype))
    y = F.layer_norm(s, (x.shape[-1],), w if w is None else w.to(x.dtype), b if b is None else b.to(x.dtype), eps)
    return (y if out_dtype is None else y.to(out_dtype).to(y.dtype)), s


def pick(which, y, s):
    """The checked output: y, s, or both in one (so that the gradients of both paths meet)."""
    if which == "both":
        return y.to(s.dtype) * 1.5 + s * 0.5
    return y if which == "y" else s


def case(rows, D, x_dtype, br_dtype, out_dtype, weight=True, bias=True, branch=True, branch_bias=True, seed=0,
         which="both"):
    x = randn(*rows, D, dtype=x_dtype, seed=seed)
    br = randn(*rows, D, dtype=br_dtype, seed=seed + 1) if branch else None
    brb = randn(D, seed=seed + 2) if branch and branch_bias else None
    w = (1 + 0.1 * randn(D, seed=seed + 3)) if weight else None
    b = 0.1 * randn(D, seed=seed + 4) if bias else None
    g = randn(*rows, D, seed=seed + 5)

    def fast(x, w, b, br, brb):
        y, s = ops.add_layer_norm(x, w, b, 1e-6, branch=br, branch_bias=brb, out_dtype=out_dtype)
        return pick(which, y, s)

    def ref(x, w, b, br, brb):
        return pick(which, *oracle(x, w, b, br, brb, out_dtype=out_dtype))

    return fast, ref, [x, w, b, br, brb], g


# rows not a multiple of a program's rows (R = 3 * 7 = 21), D = 72, 80 (not powers of two), 1024
@pytest.mark.parametrize("D", [72, 80, 1024])
@pytest.mark.parametrize("branch", [True, False])
def test_fp32_against_oracle(D, branch):
    fast, ref, inputs, g = case((3, 7), D, torch.float32, torch.float32, None, branch=branch)
    check_op(fast, ref, inputs, g, name=f"fp32 D={D}")


@pytest.mark.parametrize("D", [72, 768])
@pytest.mark.parametrize("branch", [True, False])
def test_autocast_layout_against_oracle(D, branch):
    """fp32 residual stream, bf16 branch (a GEMM's output) and bf16 y (the next GEMM's input), y and s each."""
    for which in ("y", "s"):
        fast, ref, inputs, g = case((2, 9), D, torch.float32, BF16, BF16, branch=branch, seed=3, which=which)
        check_op(fast, ref, inputs, g, name=f"autocast D={D} {which}")


def test_bf16_stream_against_oracle():
    """A bf16 model: s is rounded to bf16 and normalised as stored (as torch does); per element the rounding
    of s is random, so the error is compared by norm."""
    fast, ref, inputs, g = case((4, 50), 72, BF16, BF16, None, seed=5)
    check_op(fast, ref, inputs, g, name="bf16", elementwise=False)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_optional_parameters(affine):
    w, b = affine
    fast, ref, inputs, g = case((3, 5), 40, torch.float32, torch.float32, None, weight=w, bias=b, branch_bias=False)
    check_op(fast, ref, inputs, g, name=f"weight={w} bias={b}")


def test_without_branch_s_is_x_and_residual_gradient_joins():
    x = randn(2, 5, 16).requires_grad_(True)
    y, s = ops.add_layer_norm(x, None, None)
    assert s.data_ptr() == x.data_ptr()  # no copy: the residual is x itself
    (s * 3 + y).sum().backward()  # the residual path and the norm in one gradient
    x2 = x.detach().clone().requires_grad_(True)
    (x2 * 3 + F.layer_norm(x2, (16,), eps=1e-5)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_backward_partials_over_many_programs(monkeypatch):
    """More rows than the backward's programs (several rows each, a partial last one): the weight and bias
    sums add the partials of every program. The program cap is lowered to 8 so that 101 rows show it (the
    real cap, 1024, would need thousands of rows under the interpreter)."""
    real = _launch.row_norm_partials
    monkeypatch.setattr(_launch, "row_norm_partials", lambda R, D, max_programs=8: real(R, D, max_programs))
    cfg = _launch.row_norm_partials(101, 8)
    assert cfg.grid > 1 and cfg.rows > 1 and cfg.grid * cfg.rows > 101 and (cfg.grid - 1) * cfg.rows < 101
    assert real(2101, 8).grid * real(2101, 8).rows > 2101 > real(2101, 8).grid  # the same shape at the real cap
    fast, ref, inputs, g = case((101,), 8, torch.float32, torch.float32, None, seed=7)
    check_op(fast, ref, inputs, g, name="many rows")


def test_triton_kernels_run(triton_path):
    for which in ("y", "s"):
        fast, ref, inputs, g = case((3, 7), 72, torch.float32, BF16, BF16, seed=9, which=which)
        check_op(fast, ref, inputs, g, name=f"triton path {which}")
    fast, ref, inputs, g = case((3, 7), 72, torch.float32, torch.float32, None, seed=10)
    check_op(fast, ref, inputs, g, name="triton path fp32")
    assert {"add_layer_norm_fwd_kernel", "add_layer_norm_bwd_kernel"} <= set(triton_path)


def test_registered_ops(record_ops):
    fast, ref, inputs, g = case((3, 7), 72, torch.float32, BF16, BF16, seed=11, which="y")
    with record_ops() as rec:
        check_op(fast, ref, inputs, g, name="registered")
    assert "add_layer_norm" in rec.calls and "add_layer_norm_backward" in rec.calls


def test_bad_inputs():
    x = randn(2, 3, 8)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.add_layer_norm(x.long(), None, None)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        ops.add_layer_norm(x, randn(7), None)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.add_layer_norm(x, None, None, branch=x[:1])
    with pytest.raises(ValueError, match="branch_bias needs a branch"):
        ops.add_layer_norm(x, None, None, branch_bias=randn(8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ops.add_layer_norm(x, None, None, -1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.add_layer_norm(x, None, None, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="weight must be on"):
        ops.add_layer_norm(x, randn(8).to("meta"), None)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [512, 768, 1024])
def test_gpu_real_sizes(D):
    rows = (256, 50) if D != 512 else (256, 197)
    for which in ("y", "s"):
        fast, ref, inputs, g = case(rows, D, torch.float32, BF16, BF16, seed=13, which=which)
        check_op(fast, ref, [t.cuda() if t is not None else None for t in inputs], g.cuda(), name=f"gpu D={D} {which}")
