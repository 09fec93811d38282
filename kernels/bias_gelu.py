"""Triton kernels: bias + GELU in one pass (the MLP's fc1 epilogue), and its backward with the bias gradient.

Forward:  a = gelu(h + bias)                         fp32 math, a in h's dtype
Backward: dh = da * gelu'(h + bias)                  in h's dtype
          partial sums of dh over the program's rows (the bias gradient), fp32 [G, F]
GELU is exact (0.5 z (1 + erf(z / sqrt 2))) or, with TANH, 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
Programs: (row group, column block); each walks its rows BLOCK_R at a time. Row offsets are int64.
"""
import triton
import triton.language as tl

from ._tiles import column_block, load_rows, row_tile, store_rows

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr, GRAD: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32 (the derivative only with GRAD)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
        value = 0.5 * z * (1.0 + t)
        if GRAD:
            grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        else:
            grad = value
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        value = z * cdf
        if GRAD:
            grad = cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        else:
            grad = value
    return value, grad


@triton.jit
def bias_gelu_fwd_kernel(
    h_ptr, b_ptr, a_ptr, R, F, sh, ROWS,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    cols, col_ok = column_block(BLOCK_F, F)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows, m = row_tile(first, r0, R, ROWS, BLOCK_R, col_ok)
        z = load_rows(h_ptr, rows, cols, sh, m)
        if HAS_BIAS:
            z += b[None, :]
        a, _ = _gelu_and_grad(z, TANH, False)
        store_rows(a_ptr, rows, cols, F, a, m)


@triton.jit
def bias_gelu_bwd_kernel(
    da_ptr, h_ptr, b_ptr, dh_ptr, part_ptr, R, F, sda, sh, ROWS,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_ok = column_block(BLOCK_F, F)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows, m = row_tile(first, r0, R, ROWS, BLOCK_R, col_ok)
        z = load_rows(h_ptr, rows, cols, sh, m)
        if HAS_BIAS:
            z += b[None, :]
        da = load_rows(da_ptr, rows, cols, sda, m)
        _, grad = _gelu_and_grad(z, TANH, True)
        dh = tl.where(m, da * grad, 0.0)
        store_rows(dh_ptr, rows, cols, F, dh, m)
        acc += tl.sum(dh, axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * F + cols, acc, mask=col_ok)
