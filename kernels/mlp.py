"""Triton kernels: the two GEMMs of the MLP (fc1 -> GELU -> fc2) whose elementwise neighbours ride in their
epilogues.

fc1 forward:          z = x @ W1^T + b1, a = gelu(z)     x [M, K], W1 [N, K], b1 [N]; z, a [M, N]
fc2 dgrad with dGELU: dh = (g @ W2) * gelu'(z)           g [M, K], W2 [K, N], z [M, N]; dh [M, N]
                      part[i] = sum of dh over the rows of row block i (fp32 [cdiv(M, BLOCK_M), N]):
                      the fc1 bias gradient, once the caller adds the row blocks in order
Products accumulate in fp32; the bias is added, GELU and its derivative taken in fp32, each output rounded
once to its tensor's dtype. The other GEMMs of the MLP (fc2 forward, both weight gradients, fc1's input
gradient) have no epilogue to fuse and stay cuBLAS.

Programs: one per BLOCK_M x BLOCK_N output tile, in groups of GROUP_M row blocks (neighbouring programs
share operand tiles in L2). Every matrix has a unit column stride and a passed row stride. Tiles that pass
the edge of M or N read wrapped-around rows or columns, masked at the store (and out of the bias-gradient
sums), so the main loop has no M/N masks; K is masked unless EVEN_K. Row offsets are int64. The epilogues
run on one column quarter of a tile at a time.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bias_gelu import _gelu_and_grad


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tf32: bool  # fp32 operands: TF32 products (else IEEE fp32)


def gemm_config(dtype: torch.dtype, M: int) -> GemmConfig:
    """The tile configuration of both kernels for M rows of operands of ``dtype``.

    16-bit: 128 x 128 x 64 tiles, two warpgroups (wgmma on Hopper), 3 stages (96 KiB of shared memory).
    fp32: 128 x 64 x 64 tiles (no spills on sm_90 with IEEE or TF32 products); products are IEEE fp32 as
    torch's matmul unless torch allows TF32 (``torch.get_float32_matmul_precision() != "highest"``), as
    cuBLAS would use then.
    Fewer than 128 rows take the smallest power-of-two tile height that holds them (at least 16, one
    warpgroup): no work on rows that do not exist.
    """
    block_m = min(128, max(16, triton.next_power_of_2(max(M, 1))))
    warps = 8 if block_m == 128 else 4
    if dtype in (torch.bfloat16, torch.float16):
        return GemmConfig(block_m, 128, 64, 8, warps, 3, False)
    return GemmConfig(block_m, 64, 64, 8, warps, 3, torch.get_float32_matmul_precision() != "highest")


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: column-major within groups of GROUP_M row blocks."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _product(a_ptr, b_ptr, M, N, K, sa_m, sa_k, sb_k, sb_n, pid_m, pid_n, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TF32: tl.constexpr,
             WIDEN: tl.constexpr):
    """The fp32 tile sum_k A[m, k] B[k, n] of output tile (pid_m, pid_n); A and B addressed by strides.
    Rows past M and columns past N wrap around (valid addresses; the caller masks them). WIDEN: operands
    go to fp32 before tl.dot (for Triton's interpreter, whose tl.dot multiplies the raw bits of bf16
    values; bf16 products are exact in fp32, so the result is the tensor cores' up to summation order)."""
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * sa_m + rk[None, :] * sa_k
    b_ptrs = b_ptr + rk[:, None] * sb_k + rn[None, :] * sb_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="tf32" if TF32 else "ieee")
        a_ptrs += BLOCK_K * sa_k
        b_ptrs += BLOCK_K * sb_k
    return acc


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(t[:, :BLOCK_N // 2], t[:, BLOCK_N // 2:])."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _quarters(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four column quarters of t [BLOCK_M, BLOCK_N]. The epilogues run on one quarter at a time: their
    temporaries then take a quarter of the registers (at 128 x 128 bf16 tiles both kernels stay within 128
    registers, two programs per SM on Hopper; on whole tiles the dgrad epilogue spills)."""
    left, right = _halves(t, BLOCK_M, BLOCK_N)
    HALF: tl.constexpr = BLOCK_N // 2
    q0, q1 = _halves(left, BLOCK_M, HALF)
    q2, q3 = _halves(right, BLOCK_M, HALF)
    return q0, q1, q2, q3


@triton.jit
def mlp_fc1_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, a_ptr, M, N, K, sx_m, sw_n,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, TF32: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """z = x @ W1^T + b1 and a = gelu(z), both [M, N] contiguous; x [M, K] and W1 [N, K] have unit
    column strides."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z = _product(x_ptr, w_ptr, M, N, K, sx_m, 1, 1, sw_n, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                 TF32, WIDEN)
    q0, q1, q2, q3 = _quarters(z, BLOCK_M, BLOCK_N)
    c0 = pid_n * BLOCK_N
    Q: tl.constexpr = BLOCK_N // 4
    _fc1_epilogue(q0, b_ptr, z_ptr, a_ptr, pid_m, c0, M, N, HAS_BIAS, TANH, BLOCK_M, Q)
    _fc1_epilogue(q1, b_ptr, z_ptr, a_ptr, pid_m, c0 + Q, M, N, HAS_BIAS, TANH, BLOCK_M, Q)
    _fc1_epilogue(q2, b_ptr, z_ptr, a_ptr, pid_m, c0 + 2 * Q, M, N, HAS_BIAS, TANH, BLOCK_M, Q)
    _fc1_epilogue(q3, b_ptr, z_ptr, a_ptr, pid_m, c0 + 3 * Q, M, N, HAS_BIAS, TANH, BLOCK_M, Q)


@triton.jit
def _fc1_epilogue(z, b_ptr, z_ptr, a_ptr, pid_m, first_col, M, N, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                  BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """z += b1, a = gelu(z), both stored, on the columns first_col + [0, WIDTH) of row block pid_m."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = first_col + tl.arange(0, WIDTH)
    col_ok = cols < N
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    a, _ = _gelu_and_grad(z, TANH, False)
    m = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=m)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def mlp_fc2_dgrad_kernel(
    g_ptr, w_ptr, z_ptr, dh_ptr, part_ptr, M, N, K, sg_m, sw_k, sz_m,
    BIAS_GRAD: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, TF32: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """dh = (g @ W2) * gelu'(z) [M, N] contiguous; g [M, K], W2 [K, N] and z [M, N] have unit column strides.
    With BIAS_GRAD, part[pid_m, :] = the sum of this tile's rows of dh in fp32 (before dh is rounded)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    da = _product(g_ptr, w_ptr, M, N, K, sg_m, 1, sw_k, 1, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                  TF32, WIDEN)
    q0, q1, q2, q3 = _quarters(da, BLOCK_M, BLOCK_N)
    c0 = pid_n * BLOCK_N
    Q: tl.constexpr = BLOCK_N // 4
    _dgrad_epilogue(q0, z_ptr, dh_ptr, part_ptr, pid_m, c0, M, N, sz_m, BIAS_GRAD, TANH, BLOCK_M, Q)
    _dgrad_epilogue(q1, z_ptr, dh_ptr, part_ptr, pid_m, c0 + Q, M, N, sz_m, BIAS_GRAD, TANH, BLOCK_M, Q)
    _dgrad_epilogue(q2, z_ptr, dh_ptr, part_ptr, pid_m, c0 + 2 * Q, M, N, sz_m, BIAS_GRAD, TANH, BLOCK_M, Q)
    _dgrad_epilogue(q3, z_ptr, dh_ptr, part_ptr, pid_m, c0 + 3 * Q, M, N, sz_m, BIAS_GRAD, TANH, BLOCK_M, Q)


@triton.jit
def _dgrad_epilogue(da, z_ptr, dh_ptr, part_ptr, pid_m, first_col, M, N, sz_m, BIAS_GRAD: tl.constexpr,
                    TANH: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """dh = da * gelu'(z) on the columns first_col + [0, WIDTH) of row block pid_m (and their row sums)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = first_col + tl.arange(0, WIDTH)
    col_ok = cols < N
    m = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z = tl.load(z_ptr + rows64 * sz_m + cols[None, :], mask=m, other=0.0).to(tl.float32)
    _, grad = _gelu_and_grad(z, TANH, True)
    dh = tl.where(m, da * grad, 0.0)
    tl.store(dh_ptr + rows64 * N + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m)
    if BIAS_GRAD:
        tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(dh, axis=0), mask=col_ok)
