"""The fused forward of a pre-norm ViT block: the block as seven fused ops instead of about thirty kernels.

    y1, x = add_layer_norm(x)                      LayerNorm 1, cast to the GEMM dtype
    o     = self_attention(y1)                     qkv GEMM + attention; packed qkv gradient
    p     = linear(o, proj.weight)                 (the proj bias is added in the next op)
    y2, s = add_layer_norm(x, branch=p + bias)     residual add + LayerNorm 2 + cast
    h     = linear(y2, fc1.weight)
    a     = bias_gelu(h, fc1.bias)                 bias + GELU; the bias gradient in the same pass
    out   = residual_add(s, linear(a, fc2.weight), fc2.bias)

Under autocast the residual stream (x, s, out) stays in its own dtype (fp32 for an fp32 model) and only
the GEMMs and their inputs are in the autocast dtype, as in the reference; LayerNorm statistics are fp32.
It applies to the standard block: LayerNorm norms, no qk_norm or LayerScale, GELU in the MLP, and no
drop path or dropout while training except inside attention (:func:`unfused_reason` names what else keeps a
block on its module-by-module forward). ``set_fused_blocks(False)`` turns it off everywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..ops._registry import autocast_dtype

_enabled = True


def set_fused_blocks(enabled: bool) -> None:
    """Run every standard mae_fast.nn.Block through the fused ops (default) or module by module."""
    global _enabled
    _enabled = bool(enabled)


def fused_blocks_enabled() -> bool:
    return _enabled


def _is_identity(m) -> bool:
    return isinstance(m, nn.Identity) or (getattr(m, "drop_prob", None) == 0.0)


def _inactive_dropout(m, training: bool) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0.0 or not training))


def unfused_reason(block, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``block`` runs module by module (None when it runs fused), for input ``x`` if given."""
    if not _enabled:
        return "fused blocks are turned off (mae_fast.nn.set_fused_blocks(False))"
    if x is not None and (x.dim() != 3 or not x.is_floating_point()):
        return f"input is not a float [B, N, C] tensor (got {x.dim()} dims, {x.dtype})"
    if torch.compiler.is_compiling():
        return "torch.compile traces the module-by-module forward and fuses it itself"
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            return f"{name} is {type(norm).__name__}, not a LayerNorm over the last dim"
    if not (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(attn, "num_heads")):
        return "attn is not a qkv/proj attention"
    for name in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, name, nn.Identity())):
            return f"attn.{name} is used"
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return "attn.qkv / attn.proj are not nn.Linear"
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or dim % attn.num_heads:
        return "attn's width differs from the block's (attn_head_dim / dim_out)"
    if getattr(attn, "gate", None) is not None:
        return "attn is gated"
    if not isinstance(getattr(attn, "attn_drop", None), (nn.Dropout, nn.Identity)):
        return "attn.attn_drop is not a Dropout"
    for name in ("ls1", "ls2"):
        if not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is used"
    for name in ("drop_path1", "drop_path2"):
        if block.training and not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is active"
    if not (type(getattr(mlp, "fc1", None)) is nn.Linear and type(getattr(mlp, "fc2", None)) is nn.Linear):
        return "mlp is not an fc1/fc2 MLP"
    if type(getattr(mlp, "act", None)) is not nn.GELU:
        return f"mlp.act is {type(getattr(mlp, 'act', None)).__name__}, not GELU"
    if not _is_identity(getattr(mlp, "norm", nn.Identity())):
        return "mlp.norm is used"
    training = block.training
    for owner, name in ((attn, "proj_drop"), (mlp, "drop1"), (mlp, "drop2"), (mlp, "drop")):
        if not _inactive_dropout(getattr(owner, name, nn.Identity()), training):
            return f"dropout {name} is active"
    return None


def _after_norm1(block, y1: torch.Tensor, x: torch.Tensor, gemm_dtype: torch.dtype):
    """The block from its first LayerNorm's output y1 and its input x: (s, m), the block's output being
    s + m + mlp.fc2.bias (left to the caller, to fuse with what comes next)."""
    n2, attn, mlp = block.norm2, block.attn, block.mlp
    drop = attn.attn_drop.p if block.training and isinstance(attn.attn_drop, nn.Dropout) else 0.0
    o = ops.self_attention(y1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, scale=attn.scale,
                           dropout_p=drop, backend=getattr(attn, "attn_backend", None))  # [B, N, C]
    p = ops.linear(o, attn.proj.weight)  # [B, N, C], its bias goes into the next op
    y2, s = ops.add_layer_norm(x, n2.weight, n2.bias, n2.eps, branch=p, branch_bias=attn.proj.bias,
                               out_dtype=gemm_dtype)
    a = ops.bias_gelu(ops.linear(y2, mlp.fc1.weight), mlp.fc1.bias, mlp.act.approximate)  # [B, N, hidden]
    return s, ops.linear(a, mlp.fc2.weight)  # [B, N, C] each


def fused_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block on x [B, N, C] through the fused ops (``unfused_reason(block, x)`` must be None)."""
    gemm_dtype = autocast_dtype(x) or x.dtype
    n1 = block.norm1
    y1, x = ops.add_layer_norm(x, n1.weight, n1.bias, n1.eps, out_dtype=gemm_dtype)  # [B, N, C]
    s, m = _after_norm1(block, y1, x, gemm_dtype)
    return ops.residual_add(s, m, block.mlp.fc2.bias)  # [B, N, C] in s's dtype


def run_blocks(blocks, x: torch.Tensor, norm: Optional[nn.Module] = None,
               norm_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``norm(blocks[-1](...blocks[0](x)))`` (``norm`` None: no norm) with each block's last residual add
    fused into the next block's first LayerNorm (and into ``norm``, a LayerNorm, output in ``norm_dtype``).
    Blocks that cannot run fused run as they are, in order."""
    pending = None  # (s, m, bias): the output s + m + bias of the previous fused block, not yet added
    for block in blocks:
        if unfused_reason(block, x if pending is None else pending[0]) is not None:
            if pending is not None:
                x, pending = ops.residual_add(*pending), None
            x = block(x)
            continue
        n1 = block.norm1
        base = pending[0] if pending is not None else x
        gemm_dtype = autocast_dtype(base) or base.dtype
        if pending is None:
            y1, x = ops.add_layer_norm(x, n1.weight, n1.bias, n1.eps, out_dtype=gemm_dtype)
        else:
            s, m, bias = pending
            y1, x = ops.add_layer_norm(s, n1.weight, n1.bias, n1.eps, branch=m, branch_bias=bias,
                                       out_dtype=gemm_dtype)
        s, m = _after_norm1(block, y1, x, gemm_dtype)
        pending = (s, m, block.mlp.fc2.bias)
    if pending is not None:
        if norm is not None and type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
            s, m, bias = pending
            return ops.add_layer_norm(s, norm.weight, norm.bias, norm.eps, branch=m, branch_bias=bias,
                                      out_dtype=norm_dtype)[0]
        x = ops.residual_add(*pending)
    if norm is None:
        return x
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return ops.add_layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype=norm_dtype)[0]
    return norm(x)
