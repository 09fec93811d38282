"""linear: x @ weight^T (+ bias) with the GEMMs of its backward chosen for training under autocast.

Under autocast the GEMMs run in the autocast dtype, as ``F.linear`` does, but the weight gradient comes out
of its GEMM in fp32 on CUDA (no bf16 rounding and no cast of every weight gradient), the bias gradient is
summed in fp32, and nothing else is cast. Without autocast it is ``F.linear`` in the inputs' dtype. No
Triton kernel: the GEMMs are cuBLAS (aten.mm / aten.addmm), visible as such to tracers.
"""
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._checks import FLOAT_DTYPES, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._tensors import acc_dtype, autocast_dtype, autocast_off

__all__ = ["linear", "compute_dtype", "mm_out"]


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the GEMMs of x and weight run in: the autocast dtype on x's device, else x's dtype."""
    dtype = autocast_dtype(x)
    if dtype is None:
        if weight.dtype != x.dtype:
            raise TypeError(f"x dtype {x.dtype} differs from the weight dtype {weight.dtype} (outside autocast)")
        return x.dtype
    return dtype


# aten::mm.dtype, torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 a and b on CUDA: torch 2.8 and later
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def mm_out(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b with the result in ``out_dtype``: an fp32 result of bf16/fp16 inputs comes straight out of the
    GEMM on CUDA (and for fake tensors, which stand for CUDA ones in tracing tools) where torch has that GEMM
    (``torch.mm(..., out_dtype=torch.float32)``, torch 2.8 and later, the only cross-dtype case it supports);
    anything else is rounded in a's dtype and converted."""
    if (_MM_OUT_DTYPE and out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and (a.device.type == "cuda" or is_fake(a))):
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b).to(out_dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        with autocast_off(x):
            x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(dtype)  # [R, K]
            w = weight.to(dtype)  # [M, K]
            out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())  # [R, M]
        a = anchor(x)
        ctx.save_for_backward(x2, w, a)
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.view(*x.shape[:-1], weight.shape[0]), a

    @staticmethod
    @once_differentiable("linear")
    def backward(ctx, g):
        x2, w, _ = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g2 = g.reshape(g.shape[:-1].numel(), g.shape[-1]).to(w.dtype)  # [R, M]
        with autocast_off(g):
            dx = torch.mm(g2, w).to(x_dtype).view(x_shape) if need_x else None
            dw = mm_out(g2.t(), x2, w_dtype) if need_w else None
            db = g2.sum(0, dtype=acc_dtype(g2)).to(b_dtype) if need_b and b_dtype is not None else None
        return dx, dw, db, None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ weight [M, K]^T (+ bias [M]) -> [..., M] in the GEMM dtype (the autocast dtype under
    autocast, else x's); autograd to x, weight and bias, each gradient in its input's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must be the weight's in_features {weight.shape[1]}, got shape "
                         f"{list(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("bias", bias, (weight.shape[0],))
    return apply(_Linear, "linear", x, weight, bias, compute_dtype(x, weight))
