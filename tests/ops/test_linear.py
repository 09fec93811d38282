"""linear: x @ W^T + b and its gradients against F.linear in float64 and the same dtype; under autocast the
weight and bias gradients come back in the parameters' dtype (fp32) without a cast per step; float64."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.testing import check_op, randn, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_against_oracle(dtype, bias):
    x, w = randn(3, 7, 24, dtype=dtype), randn(40, 24, seed=1, dtype=dtype)
    b = randn(40, seed=2, dtype=dtype) if bias else None
    check_op(ops.linear, F.linear, [x, w, b], randn(3, 7, 40, seed=3), name=f"{dtype} bias={bias}")


def test_autocast_dtypes_and_accuracy():
    x = randn(4, 9, 32)
    w, b = randn(48, 32, seed=1).requires_grad_(True), randn(48, seed=2).requires_grad_(True)
    g = randn(4, 9, 48, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.linear(x, w, b)
        ref = F.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.backward(g.to(out.dtype))
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    F.linear(x.double(), w64, b64).backward(g.to(out.dtype).double())
    ours = (w.grad, b.grad)
    w.grad = b.grad = None
    ref.backward(g.to(ref.dtype))  # torch's own autocast linear, same inputs
    for a, r, e in zip(ours, (w.grad, b.grad), (w64.grad, b64.grad)):
        assert rel_err(a, e) <= 2 * rel_err(r, e) + 1e-6


def test_bad_inputs():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="in_features 7"):
        ops.linear(x, randn(4, 7))
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        ops.linear(x, randn(4, 8), randn(3))
    with pytest.raises(TypeError, match="differs from the weight dtype"):
        ops.linear(x.double(), randn(4, 8))


@pytest.mark.parametrize("a_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
def test_mm_out_dtypes(a_dtype, out_dtype):
    """The weight-gradient GEMM: the result in out_dtype on a CPU (rounded in the inputs' dtype first) and for
    fake tensors (what a tracer sees of the CUDA GEMM with an fp32 output, where torch has one), any pair."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast.ops.linear import mm_out

    a, b = randn(5, 7, dtype=a_dtype), randn(7, 3, seed=1, dtype=a_dtype)
    out = mm_out(a, b, out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, torch.mm(a, b).to(out_dtype))
    with FakeTensorMode():
        fa, fb = torch.empty(5, 7, dtype=a_dtype), torch.empty(7, 3, dtype=a_dtype)
        assert mm_out(fa, fb, out_dtype).dtype == out_dtype
