"""residual_add: s + branch + bias and all three gradients against torch in float64 and the same dtype; the
autocast layout (fp32 s, bf16 branch); the Triton kernels; the registered ops; bad inputs."""
import pytest
import torch

from mae_fast import ops
from mae_fast.testing import check_op, randn


def case(rows, D, s_dtype, br_dtype, bias=True, seed=0):
    s, br = randn(*rows, D, dtype=s_dtype, seed=seed), randn(*rows, D, dtype=br_dtype, seed=seed + 1)
    b = randn(D, seed=seed + 2) if bias else None
    g = randn(*rows, D, seed=seed + 3)
    return (ops.residual_add, lambda s, br, b: s + br.to(s.dtype) + (0 if b is None else b.to(s.dtype)),
            [s, br, b], g)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("D", [72, 1024])
def test_against_oracle(dtypes, D):
    fast, ref, inputs, g = case((3, 7), D, *dtypes)
    check_op(fast, ref, inputs, g, name=f"{dtypes} D={D}")


def test_without_bias_and_only_some_gradients():
    fast, ref, inputs, g = case((5,), 40, torch.float32, torch.bfloat16, bias=False)
    check_op(fast, ref, inputs, g, name="no bias")
    s = randn(4, 8).requires_grad_(True)
    ops.residual_add(s, randn(4, 8, seed=1)).backward(torch.ones(4, 8))
    assert torch.equal(s.grad, torch.ones(4, 8))  # the residual's gradient passes through unchanged


def test_triton_kernels_run(triton_path):
    fast, ref, inputs, g = case((70,), 300, torch.float32, torch.bfloat16, seed=3)
    check_op(fast, ref, inputs, g, name="triton path")
    assert {"residual_add_fwd_kernel", "residual_add_bwd_kernel"} <= set(triton_path)


def test_registered_ops(record_ops):
    fast, ref, inputs, g = case((3, 4), 64, torch.float32, torch.bfloat16, seed=5)
    with record_ops() as rec:
        check_op(fast, ref, inputs, g, name="registered")
    assert "residual_add" in rec.calls and "residual_add_backward" in rec.calls


def test_bad_inputs():
    s = randn(2, 8)
    with pytest.raises(ValueError, match="branch must have s's shape"):
        ops.residual_add(s, s[:1])
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        ops.residual_add(s, s, randn(4))
    with pytest.raises(ValueError, match="branch must be on"):
        ops.residual_add(s, s.to("meta"))
