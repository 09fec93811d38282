"""Triton kernels of qkv_attention: softmax(q k^T * scale) v (no mask, no dropout) for MAE's short sequences,
reading q, k, v where they are (the qkv GEMM's output [B*N, 3*H*hd], or any strided [B, H, N, hd] views)
and writing the backward's dq, dk, dv straight into the packed gradient of that GEMM's output.

Forward (one program per (query block, b, h), looping over key blocks with an online softmax; a sequence of
up to 64 tokens is one block of each):
    o [B, N, H*hd] (any strides), lse [B, H, N] fp32: log2 sum_j 2^(s_ij), s = q k^T * scale * log2(e)
Backward (delta = rowsum(o * do), the same in every program that needs it, computed where it is needed):
    WHOLE: one program per (b, h) holding all its queries, looping over key blocks; each key block's dk, dv
           are complete in that iteration and dq after the loop (5 products per tile, nothing recomputed).
    else:  programs (key block, b, h) accumulate dk, dv over all queries, programs (query block, b, h) dq
           over all keys, in one launch (7 products per tile: scores and dP are computed twice).
    Every gradient element is written by one program (no atomics: deterministic). With NEED_PART each
    program also writes the fp32 column sums of its dq / dk / dv rows (the qkv bias gradient's partial sums,
    [NB, B, 3, H, hd], added in a fixed order by the caller).
Softmax statistics, accumulators and sums are fp32; the products P V, dO V^T, P^T dO, dS^T Q, dS K take P and
dS in the input dtype, as FlashAttention does (``PRECISION``: "tf32" for 16-bit inputs, where it is ignored;
"ieee" for fp32, exact fp32 products; "upcast" under Triton's interpreter with bf16, see :func:`_dot`).
Head dims are padded to a power of two (>= 16) with masked loads; offsets are int64.
"""
from typing import NamedTuple

import triton
import triton.language as tl


class AttentionTiles(NamedTuple):
    """Tile sizes of one launch: query rows (block_m) x key rows (block_n) x padded head dim (block_d);
    ``whole``: the backward holds all queries of a (b, h) in one program; ``blocks``: the programs per (b, h)."""

    block_m: int
    block_n: int
    block_d: int
    whole: bool
    blocks: int
    num_warps: int


def _block_d(hd: int) -> int:
    return max(16, triton.next_power_of_2(max(hd, 1)))


def forward_tiles(N: int, hd: int) -> AttentionTiles:
    """Up to 64 tokens at head dims up to 128: one query block and one key block (a 50-token encoder is one
    64 x 64 tile). Otherwise 64-row query blocks against key blocks of 64 (head dims up to 64), 32 (65-128)
    or 16, and 32-row query blocks beyond head dim 128."""
    bd = _block_d(hd)
    if N <= 64 and bd <= 128:
        bm = bn = max(16, triton.next_power_of_2(max(N, 1)))
    else:
        bm = 64 if bd <= 128 else 32
        bn = 64 if bd <= 64 else (32 if bd <= 128 else 16)
    return AttentionTiles(bm, bn, bd, bm >= N, triton.cdiv(max(N, 1), bm), 4 if bd <= 64 else 8)


def backward_tiles(N: int, hd: int) -> AttentionTiles:
    """WHOLE while all queries of a (b, h) fit one tile of at most 8192 elements (N <= 256 at head dim 32,
    128 at 64, 64 at 65-128), walking the keys 32 at a time (16 beyond head dim 64): the decoder's 197 tokens
    at head dim 32 are one program per (b, h), and so is a 50-token encoder at head dim 64. Beyond: blocked,
    64 x 64 tiles (32 x 32 beyond head dim 64, 16 x 16 beyond 256). No register spills for sm_90 at these
    sizes and warps (scripts/triton_check.py); GPU timings may move them (bench/bench_qkv_attention.py
    --sweep)."""
    bd = _block_d(hd)
    bq = max(16, triton.next_power_of_2(max(N, 1)))
    if bq * bd <= 8192:
        bn = min(bq, 32 if bd <= 64 else 16)
        return AttentionTiles(bq, bn, bd, True, 1, 4 if bq * bd <= 1024 else 8)
    b = 64 if bd <= 64 else (32 if bd <= 256 else 16)
    return AttentionTiles(b, b, bd, False, 2 * triton.cdiv(N, b), 4 if bd <= 32 else 8)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with an fp32 result. PRECISION "ieee" (fp32 inputs, exact products) or "tf32" (ignored for 16-bit
    inputs); "upcast": 16-bit operands widened to fp32 first (exact, the same products), for Triton's
    interpreter, which multiplies bfloat16 operands as their raw bits."""
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _operand(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 x rounded to the inputs' dtype for a product (P, dS). "upcast" (the interpreter, bfloat16): rounded
    to nearest bfloat16 by its bits and kept in fp32, since the interpreter's casts truncate where a GPU's round
    (truncating every probability would bias the products)."""
    if PRECISION == "upcast":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _tile(base, rows, row_ok, sn, cols, col_ok, sd):
    """The tile base[rows * sn + cols * sd] (rows int64), 0 outside the masks."""
    return tl.load(base + rows[:, None] * sn + cols[None, :] * sd, mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _store(base, rows, row_ok, sn, cols, col_ok, sd, value, PRECISION: tl.constexpr):
    """Store the fp32 tile ``value`` at base[rows * sn + cols * sd] in base's dtype (rounded to nearest)."""
    value = _operand(value, base.dtype.element_ty, PRECISION)
    tl.store(base + rows[:, None] * sn + cols[None, :] * sd, value.to(base.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def qkv_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    H, N, HD, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (B*H*cdiv(N, BLOCK_M),): program (b*H + h)*blocks + query block. qk_scale = scale * log2(e): the
    softmax runs in base 2."""
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BLOCK_M)
    bh = pid // nb
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = (pid % nb).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    q = _tile(q_ptr + b * sqb + h * sqh, rows, row_ok, sqn, d, d_ok, sqd)  # [BLOCK_M, BLOCK_D]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (base 2)
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        k = _tile(k_base, cols, col_ok, skn, d, d_ok, skd)  # [BLOCK_N, BLOCK_D]
        v = _tile(v_base, cols, col_ok, svn, d, d_ok, svd)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)  # 0 on the first block (m = -inf)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_operand(p, v.dtype, PRECISION), v, PRECISION)
        m = m_new
    _store(o_ptr + b * sob + h * soh, rows, row_ok, son, d, d_ok, sod, acc / l[:, None], PRECISION)
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m + tl.log2(l), mask=row_ok)


@triton.jit
def _probs_and_grads(q, k, v, do, lse2, delta, col_ok, qk_scale, PRECISION: tl.constexpr):
    """(P, dS / scale) of a [queries, keys] tile: P = exp2(q k^T * qk_scale - lse2), dS / scale = P * (dO v^T -
    delta); 0 at keys outside the sequence (queries outside have lse2 = inf, so P = 0 there)."""
    s = _dot(q, tl.trans(k), PRECISION)
    p = tl.where(col_ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _query_rows(q_base, do_base, o_base, lse_base, rows, N, d, d_ok, sqn, sqd, sdon, sdod, son, sod):
    """(q, do, lse2, delta = rowsum(o * do)) of the query rows ``rows``."""
    row_ok = rows < N
    q = _tile(q_base, rows, row_ok, sqn, d, d_ok, sqd)
    do = _tile(do_base, rows, row_ok, sdon, d, d_ok, sdod)
    o = _tile(o_base, rows, row_ok, son, d, d_ok, sod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    return q, do, lse2, delta


@triton.jit
def _query_block(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, dk_base, dv_base, part_base, blk,
                 N, HD, part_stride, scale, qk_scale, sqn, sqd, skn, skd, svn, svd, son, sod, sdon, sdod, sdqn, sdqd,
                 sdkn, sdkd, sdvn, sdvd, WHOLE: tl.constexpr, NEED_PART: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Query block ``blk``: dq over all keys; WHOLE (all queries here): also every key block's dk, dv."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    q, do, lse2, delta = _query_rows(q_base, do_base, o_base, lse_base, rows, N, d, d_ok, sqn, sqd, sdon, sdod,
                                     son, sod)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dk_sum = tl.zeros([BLOCK_D], tl.float32)
    dv_sum = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        k = _tile(k_base, cols, col_ok, skn, d, d_ok, skd)  # [BLOCK_N, BLOCK_D]
        v = _tile(v_base, cols, col_ok, svn, d, d_ok, svd)
        p, ds = _probs_and_grads(q, k, v, do, lse2, delta, col_ok, qk_scale, PRECISION)  # [BLOCK_M, BLOCK_N]
        dq += _dot(_operand(ds, k.dtype, PRECISION), k, PRECISION)
        if WHOLE:  # all queries are here: this key block's dk, dv are complete
            dv = _dot(tl.trans(_operand(p, do.dtype, PRECISION)), do, PRECISION)  # [BLOCK_N, BLOCK_D]
            dk = _dot(tl.trans(_operand(ds, q.dtype, PRECISION)), q, PRECISION) * scale
            _store(dk_base, cols, col_ok, sdkn, d, d_ok, sdkd, dk, PRECISION)
            _store(dv_base, cols, col_ok, sdvn, d, d_ok, sdvd, dv, PRECISION)
            if NEED_PART:
                dk_sum += tl.sum(dk, 0)
                dv_sum += tl.sum(dv, 0)
    dq = dq * scale
    _store(dq_base, rows, row_ok, sdqn, d, d_ok, sdqd, dq, PRECISION)
    if NEED_PART:
        tl.store(part_base + d, tl.sum(dq, 0), mask=d_ok)
        if WHOLE:
            tl.store(part_base + part_stride + d, dk_sum, mask=d_ok)
            tl.store(part_base + 2 * part_stride + d, dv_sum, mask=d_ok)


@triton.jit
def _key_block(q_base, k_base, v_base, o_base, do_base, lse_base, dk_base, dv_base, part_base, blk,
               N, HD, part_stride, scale, qk_scale, sqn, sqd, skn, skd, svn, svd, son, sod, sdon, sdod,
               sdkn, sdkd, sdvn, sdvd, NEED_PART: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Key block ``blk``: dk, dv over all queries."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    k = _tile(k_base, cols, col_ok, skn, d, d_ok, skd)  # [BLOCK_N, BLOCK_D]
    v = _tile(v_base, cols, col_ok, svn, d, d_ok, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        q, do, lse2, delta = _query_rows(q_base, do_base, o_base, lse_base, rows, N, d, d_ok, sqn, sqd, sdon, sdod,
                                         son, sod)
        p, ds = _probs_and_grads(q, k, v, do, lse2, delta, col_ok, qk_scale, PRECISION)  # [BLOCK_M, BLOCK_N]
        dv += _dot(tl.trans(_operand(p, do.dtype, PRECISION)), do, PRECISION)
        dk += _dot(tl.trans(_operand(ds, q.dtype, PRECISION)), q, PRECISION)
    dk = dk * scale
    _store(dk_base, cols, col_ok, sdkn, d, d_ok, sdkd, dk, PRECISION)
    _store(dv_base, cols, col_ok, sdvn, d, d_ok, sdvd, dv, PRECISION)
    if NEED_PART:
        tl.store(part_base + part_stride + d, tl.sum(dk, 0), mask=d_ok)
        tl.store(part_base + 2 * part_stride + d, tl.sum(dv, 0), mask=d_ok)


@triton.jit
def qkv_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, part_ptr,
    B, H, N, HD, scale, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    WHOLE: tl.constexpr, NEED_PART: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (B*H*blocks,): program (b*H + h)*blocks + block. WHOLE: blocks = 1. Else blocks = 2 * cdiv(N,
    BLOCK_M) with BLOCK_M == BLOCK_N: the key blocks, then the query blocks. qk_scale = scale * log2(e)."""
    nb = tl.cdiv(N, BLOCK_M)
    if WHOLE:
        bh = tl.program_id(0)
    else:
        bh = tl.program_id(0) // (2 * nb)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_base = o_ptr + b * sob + h * soh
    do_base = do_ptr + b * sdob + h * sdoh
    dq_base = dq_ptr + b * sdqb + h * sdqh
    dk_base = dk_ptr + b * sdkb + h * sdkh
    dv_base = dv_ptr + b * sdvb + h * sdvh
    lse_base = lse_ptr + bh.to(tl.int64) * N
    part_stride = H * HD  # partial sums [NB, B, 3, H, HD]: block blk's (b, part, h) row
    if WHOLE:
        _query_block(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, dk_base, dv_base,
                     part_ptr + (b * 3 * H + h) * HD, 0, N, HD, part_stride, scale, qk_scale,
                     sqn, sqd, skn, skd, svn, svd, son, sod, sdon, sdod, sdqn, sdqd, sdkn, sdkd, sdvn, sdvd,
                     True, NEED_PART, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    else:
        pid = tl.program_id(0) - bh * (2 * nb)
        blk = pid % nb
        part_base = part_ptr + ((blk.to(tl.int64) * B + b) * 3 * H + h) * HD
        if pid >= nb:
            _query_block(q_base, k_base, v_base, o_base, do_base, lse_base, dq_base, dk_base, dv_base,
                         part_base, blk, N, HD, part_stride, scale, qk_scale,
                         sqn, sqd, skn, skd, svn, svd, son, sod, sdon, sdod, sdqn, sdqd, sdkn, sdkd, sdvn, sdvd,
                         False, NEED_PART, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        else:
            _key_block(q_base, k_base, v_base, o_base, do_base, lse_base, dk_base, dv_base, part_base, blk,
                       N, HD, part_stride, scale, qk_scale, sqn, sqd, skn, skd, svn, svd, son, sod, sdon, sdod,
                       sdkn, sdkd, sdvn, sdvd, NEED_PART, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
