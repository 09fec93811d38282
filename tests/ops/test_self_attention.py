"""self_attention: the qkv projection + attention + its packed backward against F.linear + SDPA (the timm
layout) in float64 and the same dtype, with and without the qkv bias, fp32 and autocast; dropout consumes
the RNG as SDPA does; the packing kernel on the Triton path; the registered op; bad inputs; GPU sizes."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.ops.self_attention import pack_qkv_grad_torch
from mae_fast.testing import check_op, randn, rel_err


def reference(x, w, b, H, dropout_p=0.0):
    B, N, C = x.shape
    qkv = F.linear(x, w, b).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=dropout_p)  # [B, H, N, hd]
    return o.transpose(1, 2).reshape(B, N, C)


def case(B, N, C, H, bias=True, dtype=torch.float32, seed=0):
    x = randn(B, N, C, seed=seed, dtype=dtype)
    w = randn(3 * C, C, seed=seed + 1, dtype=dtype) * C ** -0.5
    b = randn(3 * C, seed=seed + 2, dtype=dtype) if bias else None
    return [x, w, b], randn(B, N, C, seed=seed + 3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 24, 3), (3, 50, 72, 3), (2, 17, 64, 2)])
def test_fp32_against_oracle(bias, shape):
    B, N, C, H = shape
    inputs, g = case(B, N, C, H, bias)
    check_op(lambda x, w, b: ops.self_attention(x, w, b, H, backend="math"), lambda x, w, b: reference(x, w, b, H),
             inputs, g, name=f"{shape} bias={bias}")


def test_autocast_against_torch():
    """bf16 autocast: the error against float64 within twice torch's own (autocast F.linear + SDPA)."""
    B, N, C, H = 2, 17, 48, 4
    (x, w, b), g = case(B, N, C, H)
    exact = [t.double().requires_grad_(True) for t in (x, w, b)]
    reference(*exact, H).backward(g.double())
    errs = {}
    for name, fn in (("ours", lambda *a: ops.self_attention(*a, H)), ("torch", lambda *a: reference(*a, H))):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves)
        assert out.dtype == torch.bfloat16
        out.backward(g.to(out.dtype))
        errs[name] = [rel_err(t.grad, e.grad) for t, e in zip(leaves, exact)]
        assert all(t.grad.dtype == torch.float32 for t in leaves)
    for ours, ref in zip(errs["ours"], errs["torch"]):
        assert ours <= 2 * ref + 1e-6, errs


def test_dropout_draws_as_sdpa():
    B, N, C, H = 2, 9, 24, 3
    inputs, g = case(B, N, C, H)
    torch.manual_seed(5)
    ours = ops.self_attention(*inputs, H, dropout_p=0.3, backend="math")
    torch.manual_seed(5)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = reference(*inputs, H, dropout_p=0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert rel_err(ours, ops.self_attention(*inputs, H, backend="math")) > 0.05  # dropout is on


def test_second_backward_is_a_clear_error():
    inputs, g = case(2, 5, 8, 2)
    x = inputs[0].requires_grad_(True)
    out = ops.self_attention(x, inputs[1], inputs[2], 2)
    out.backward(g, retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(g)


@pytest.mark.parametrize("bias", [True, False])
def test_pack_kernel_on_the_triton_path(triton_path, bias):
    inputs, g = case(2, 13, 40, 5, bias, seed=7)
    check_op(lambda x, w, b: ops.self_attention(x, w, b, 5, backend="math"), lambda x, w, b: reference(x, w, b, 5),
             inputs, g, name="triton path")
    assert "pack_qkv_grad_kernel" in triton_path


def test_pack_torch_path_is_the_layout_of_qkv():
    B, H, N, hd = 2, 3, 5, 4
    dq, dk, dv = (randn(B, H, N, hd, seed=i) for i in range(3))
    dqkv, dbias = pack_qkv_grad_torch(dq, dk, dv, True)
    qkv = dqkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # the forward's view of qkv, on the gradient
    assert torch.equal(qkv[0], dq) and torch.equal(qkv[1], dk) and torch.equal(qkv[2], dv)
    torch.testing.assert_close(dbias, dqkv.sum(0))


def test_registered_op(record_ops):
    inputs, g = case(2, 9, 24, 3, seed=9)
    with record_ops() as rec:
        check_op(lambda x, w, b: ops.self_attention(x, w, b, 3, backend="math"),
                 lambda x, w, b: reference(x, w, b, 3), inputs, g, name="registered")
    assert "pack_qkv_grad" in rec.calls


def test_bad_inputs():
    (x, w, b), _ = case(2, 5, 8, 2)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing C=8"):
        ops.self_attention(x, w, b, 3)
    with pytest.raises(ValueError, match=r"qkv_weight must have shape \[24, 8\]"):
        ops.self_attention(x, w[:-1], b, 2)
    with pytest.raises(ValueError, match=r"qkv_bias must have shape \[24\]"):
        ops.self_attention(x, w, b[:-1], 2)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        ops.self_attention(x[0], w, b, 2)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.self_attention(x, w, b, 2, dropout_p=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 50, 768, 12), (256, 197, 512, 16)])
def test_gpu_real_sizes(shape):
    B, N, C, H = shape
    (x, w, b), g = case(B, N, C, H)
    exact = [t.cuda().double().requires_grad_(True) for t in (x, w, b)]
    reference(*exact, H).backward(g.cuda().double())
    errs = {}
    for name, fn in (("ours", lambda *a: ops.self_attention(*a, H)), ("torch", lambda *a: reference(*a, H))):
        leaves = [t.cuda().requires_grad_(True) for t in (x, w, b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(*leaves)
        out.backward(g.cuda().to(out.dtype))
        errs[name] = [rel_err(t.grad, e.grad) for t, e in zip(leaves, exact)]
    for ours, ref in zip(errs["ours"], errs["torch"]):
        assert ours <= 2 * ref + 1e-6, errs
