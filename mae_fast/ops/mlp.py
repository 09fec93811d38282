"""mlp: a ViT block's MLP, fc2(gelu(fc1(x))), with bias + GELU in fc1's GEMM and dGELU in fc2's input-gradient
GEMM.

``out = mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None, approximate="none")`` over x [..., D] with
fc1 [H, D] and fc2 [O, H]: out [..., O]. GELU is exact (erf), as nn.GELU, unless ``approximate="tanh"``.

GEMMs: fc1's forward writes z = x @ W1^T + b1 and a = gelu(z) from one Triton GEMM (kernels/mlp.py); the
backward's dh = (dout @ W2) * gelu'(z) comes from another, whose epilogue also sums dh over its rows for
fc1's bias gradient (fp32 partial sums per row block, added in a fixed order: deterministic). fc2's forward,
both weight gradients and fc1's input gradient are cuBLAS, as in :func:`mae_fast.ops.linear`. Dtypes as
``ops.linear``: under autocast the GEMMs run in the autocast dtype and the weight and bias gradients come out
in the parameters' dtype (fp32 weight gradients straight out of their GEMM on CUDA); without autocast
everything is in x's dtype. Biases are added in fp32. float64 takes the plain torch path
(:func:`mlp_fc1_torch`, :func:`mlp_fc2_dgrad_gelu_torch`), which is also the CPU path and the tests' oracle.

Saved for the backward: x and the weights in the GEMM dtype, a (for fc2's weight gradient) and the
pre-activation z (for gelu'). Recomputing z in the backward instead would cost fc1's GEMM again (2 R H D
FLOPs, 60 GFLOP for a ViT-B/16 encoder block at batch 256) to save writing and reading z (4 R H bytes,
157 MB there): keeping z costs less.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from mae_fast.kernels import mlp as _k

from ._checks import FLOAT_DTYPES, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import acc_dtype, autocast_dtype, autocast_off, dense, no_grad_placeholder, rows, unused_pointer, wide
from ._triton import launch
from .paths import triton_interpret, use_triton
from .linear import mm_out

__all__ = ["mlp", "mlp_fc1_torch", "mlp_fc2_dgrad_gelu_torch"]
APPROXIMATIONS = ("none", "tanh")


def mlp_fc1_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    """Plain torch fc1 + GELU on rows x [R, D]: (a, z) [R, H] in x's dtype, computed in fp32 (float64 stays)."""
    xw = wide(x)
    z = F.linear(xw, weight.to(xw.dtype), None if bias is None else bias.to(xw.dtype))  # [R, H]
    return F.gelu(z, approximate=approximate).to(x.dtype), z.to(x.dtype)


def mlp_fc2_dgrad_gelu_torch(g: Tensor, weight: Tensor, z: Tensor, approximate: str,
                             bias_grad: bool) -> tuple[Tensor, Tensor]:
    """Plain torch (dh [R, H] in z's dtype, fc1's bias gradient [H] in fp32, or an empty placeholder) from the
    output gradient g [R, O], fc2's weight [O, H] and the pre-activation z [R, H]."""
    dh = torch.ops.aten.gelu_backward(wide(g) @ wide(weight), wide(z), approximate=approximate)  # [R, H]
    return dh.to(z.dtype), (dh.sum(0) if bias_grad else no_grad_placeholder(z))


def _unit_columns(w: Tensor) -> Tensor:
    """w with a unit column stride, the kernels' layout (what the op passes has it: no copy)."""
    return w if w.stride(-1) == 1 else w.contiguous()


def _config(x: Tensor):
    """The launch configuration for x [M, K] (the A operand); WIDEN only where the interpreter runs the kernel
    (a fake tensor stands for a CUDA one: tracing tools record the GPU's launch)."""
    (M, K), dtype = x.shape, x.dtype
    cfg = _k.gemm_config(dtype, M)
    return cfg, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                     EVEN_K=K % cfg.block_k == 0, TF32=cfg.tf32,
                     WIDEN=triton_interpret() and dtype == torch.bfloat16 and not is_fake(x), num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)


@register_op("mlp_fc1")
def _fc1(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    """(a, z) [R, H]: a = gelu(z), z = x @ weight^T + bias; x [R, D], weight [H, D]."""
    if not use_triton(x):
        return mlp_fc1_torch(x, weight, bias, approximate)
    x, weight = _unit_columns(x), _unit_columns(weight)
    (M, K), N = x.shape, weight.shape[0]
    z = torch.empty((M, N), dtype=x.dtype, device=x.device)
    a = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if z.numel() == 0:
        return a, z
    cfg, meta = _config(x)
    launch(_k.mlp_fc1_kernel)[(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)](
        x, weight, bias if bias is not None else unused_pointer(x), z, a, M, N, K, x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", **meta,
    )
    return a, z


@register_op("mlp_fc2_dgrad_gelu")
def _fc2_dgrad(g: Tensor, weight: Tensor, z: Tensor, approximate: str, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """(dh [R, H] in z's dtype, fc1's bias gradient [H] fp32 or a placeholder): dh = (g @ weight) * gelu'(z)
    with g [R, O], weight [O, H], z [R, H]."""
    if not use_triton(g):
        return mlp_fc2_dgrad_gelu_torch(g, weight, z, approximate, bias_grad)
    g, weight, z = _unit_columns(g), _unit_columns(weight), _unit_columns(z)
    (M, K), N = g.shape, weight.shape[1]
    dh = torch.empty((M, N), dtype=z.dtype, device=z.device)
    if dh.numel() == 0:
        return dh, (torch.zeros((N,), dtype=torch.float32, device=z.device) if bias_grad else no_grad_placeholder(z))
    cfg, meta = _config(g)
    part = torch.empty((triton.cdiv(M, cfg.block_m), N) if bias_grad else (1,), dtype=torch.float32, device=z.device)
    launch(_k.mlp_fc2_dgrad_kernel)[(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)](
        g, weight, z, dh, part, M, N, K, g.stride(0), weight.stride(0), z.stride(0),
        BIAS_GRAD=bias_grad, TANH=approximate == "tanh", **meta,
    )
    return dh, (part.sum(0) if bias_grad else no_grad_placeholder(z))


@register_flop_formula(torch.ops.mae_fast.mlp_fc1)
def _fc1_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]  # [R, D] @ [D, H]


@register_flop_formula(torch.ops.mae_fast.mlp_fc2_dgrad_gelu)
def _fc2_dgrad_flops(g_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * weight_shape[1]  # [R, O] @ [O, H]


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate, dtype):
        with autocast_off(x):
            x2 = rows(x).to(dtype)  # [R, D]
            w1c, w2c = _unit_columns(w1.to(dtype)), _unit_columns(w2.to(dtype))  # [H, D], [O, H]
            a, z = _fc1(x2, w1c, dense(b1), approximate)  # [R, H] each
            out = torch.mm(a, w2c.t()) if b2 is None else torch.addmm(b2.to(dtype), a, w2c.t())  # [R, O]
        anc = anchor(x)
        ctx.save_for_backward(x2, w1c, w2c, a, z, anc)
        ctx.meta = (x.shape, x.dtype, w1.dtype, None if b1 is None else b1.dtype, w2.dtype,
                    None if b2 is None else b2.dtype, approximate)
        return out.view(*x.shape[:-1], w2.shape[0]), anc

    @staticmethod
    @once_differentiable("mlp")
    def backward(ctx, dout):
        x2, w1c, w2c, a, z, _ = ctx.saved_tensors
        x_shape, x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype, approximate = ctx.meta
        need_x, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
        need_b1 = need_b1 and b1_dtype is not None
        dx = dw1 = db1 = dw2 = db2 = None
        with autocast_off(dout):
            g = rows(dout).to(w2c.dtype)  # [R, O]
            if need_w2:
                dw2 = mm_out(g.t(), a, w2_dtype)  # [O, H]
            if need_b2 and b2_dtype is not None:
                db2 = g.sum(0, dtype=acc_dtype(g)).to(b2_dtype)  # [O], fp32 accumulation
            if need_x or need_w1 or need_b1:
                dh, db = _fc2_dgrad(g, w2c, z, approximate, need_b1)  # [R, H], [H]
                db1 = db.to(b1_dtype) if need_b1 else None
                dw1 = mm_out(dh.t(), x2, w1_dtype) if need_w1 else None  # [H, D]
                dx = torch.mm(dh, w1c).to(x_dtype).view(x_shape) if need_x else None  # [..., D]
        return dx, dw1, db1, dw2, db2, None, None


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
        fc2_bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """fc2(gelu(fc1(x))): x [..., D], fc1_weight [H, D], fc1_bias [H] or None, fc2_weight [O, H], fc2_bias [O]
    or None -> [..., O] in the GEMM dtype (the autocast dtype under autocast, else x's); autograd to x and all
    four parameters, each gradient in its input's dtype. ``approximate``: "none" (exact, erf) or "tanh", as
    ``torch.nn.functional.gelu``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("fc1_weight", fc1_weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("fc2_weight", fc2_weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    H, D = fc1_weight.shape
    if x.dim() < 1 or x.shape[-1] != D:
        raise ValueError(f"x's last dim must be fc1_weight's in_features {D}, got shape {list(x.shape)}")
    check_shape("fc2_weight", fc2_weight, (None, H))
    if fc1_bias is not None:
        check_tensor("fc1_bias", fc1_bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("fc1_bias", fc1_bias, (H,))
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("fc2_bias", fc2_bias, (fc2_weight.shape[0],))
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    dtype = autocast_dtype(x)
    if dtype is None:
        for name, w in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
            if w.dtype != x.dtype:
                raise TypeError(f"{name} must have x's dtype {x.dtype} outside autocast, got {w.dtype}")
        dtype = x.dtype
    return apply(_Mlp, "mlp", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, dtype)
