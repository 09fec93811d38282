"""bias_gelu: forward and both gradients against F.gelu(h + bias) in float64 and the same dtype, exact and
tanh GELU, fp32 and bf16, odd widths, no bias; the Triton kernels; the registered ops; bad inputs; GPU sizes."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.testing import check_op, randn


def case(rows, Fd, dtype, approximate, bias=True, seed=0):
    h = 2 * randn(*rows, Fd, dtype=dtype, seed=seed)
    b = randn(Fd, dtype=dtype, seed=seed + 1) if bias else None
    g = randn(*rows, Fd, seed=seed + 2)
    return (lambda h, b: ops.bias_gelu(h, b, approximate),
            lambda h, b: F.gelu(h if b is None else h + b, approximate=approximate), [h, b], g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("Fd", [300, 3072])
def test_against_oracle(dtype, approximate, Fd):
    fast, ref, inputs, g = case((3, 7), Fd, dtype, approximate)
    check_op(fast, ref, inputs, g, name=f"{dtype} {approximate} F={Fd}")


def test_without_bias():
    fast, ref, inputs, g = case((5,), 40, torch.float32, "none", bias=False)
    check_op(fast, ref, inputs, g, name="no bias")


def test_exact_gelu_is_not_the_tanh_form():
    h = torch.linspace(-4, 4, 101)
    exact, tanh = ops.bias_gelu(h[None], None), ops.bias_gelu(h[None], None, "tanh")
    assert (exact - tanh).abs().max() > 1e-4  # the two forms differ by up to ~5e-4: each is what it says
    torch.testing.assert_close(exact[0], F.gelu(h), rtol=1e-6, atol=1e-6)


def test_triton_kernels_run(triton_path):
    fast, ref, inputs, g = case((33,), 300, torch.float32, "none", seed=3)
    check_op(fast, ref, inputs, g, name="triton path")
    assert {"bias_gelu_fwd_kernel", "bias_gelu_bwd_kernel"} <= set(triton_path)


def test_registered_ops(record_ops):
    fast, ref, inputs, g = case((3, 4), 64, torch.float32, "tanh", seed=5)
    with record_ops() as rec:
        check_op(fast, ref, inputs, g, name="registered")
    assert "bias_gelu" in rec.calls and "bias_gelu_backward" in rec.calls


def test_bad_inputs():
    h = randn(2, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        ops.bias_gelu(h, randn(7))
    with pytest.raises(ValueError, match="approximate must be one of"):
        ops.bias_gelu(h, None, "erf")
    with pytest.raises(TypeError, match="h must have dtype"):
        ops.bias_gelu(h.long(), None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_size(dtype):
    fast, ref, inputs, g = case((256, 50), 3072, dtype, "none", seed=7)
    check_op(fast, ref, [t.cuda() for t in inputs], g.cuda(), name="gpu")
