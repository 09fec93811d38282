"""Triton kernels: the inverse of an index tensor, safe for any values, for the backward of the gathers.

ids [N, K] names, for each output row k, the source row ids[n, k] it was read from (values meant to lie
in [0, L)). A backward that writes each source row once (l-major, no atomics on floats) needs the
inverse. :func:`build_map` makes it for one sample n, for whatever the ids hold:

    code[n, l] = k         the smallest k with ids[n, k] == l, when no other k names l
               = -(k + 1)  the same k, when more follow (a chain: nxt[n, k] is the next, -1 ends it)
               = BIG       no k names l (BIG = 2**31 - 1, so ``k < K`` tells a hit)
    nxt[n, k]  = the next k' > k with ids[n, k'] == ids[n, k], else -1; written only for a sample whose
                 ids repeat a value (no other reader looks at it)

Values outside [0, L) name no row: they are skipped (the forward kernels made their output rows NaN).
It returns flags: 1 when a value repeats, 2 when one lies outside [0, L).

Cost when nothing repeats (what the masking engine's ids give): one pass to fill the row with BIG, one
integer atomic min per id and one read back of the winner, int32, about what a torch scatter of the
inverse costs. Chains are built only for a sample whose ids repeat (a compare of every pair of its ids),
so the readers pay nothing for them otherwise: they read nxt only where code is negative.
Integer atomics are exact and order-free, so the result does not depend on scheduling.
"""
import triton
import triton.language as tl

BIG = 2147483647


@triton.jit
def id_block(ids_ptr, n, sin, sik, k0, K, L, BLOCK: tl.constexpr):
    """Entries k0 .. k0 + BLOCK of row n of ids: (k, k < K, the ids as int64 (0 past K), k < K and the id in
    [0, L))."""
    k = k0 + tl.arange(0, BLOCK)
    k_ok = k < K
    v = tl.load(ids_ptr + n * sin + k.to(tl.int64) * sik, mask=k_ok, other=0).to(tl.int64)
    return k, k_ok, v, k_ok & (v >= 0) & (v < L)


@triton.jit
def build_map(ids_ptr, code_ptr, nxt_ptr, n, K, L, sin, sik,
              BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write code[n, :L] and (for repeats) nxt[n, :K] of sample n (an int64 scalar); return the flags."""
    code_row = code_ptr + n * L
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        tl.store(code_row + offs, tl.full([BLOCK_L], 2147483647, tl.int32), mask=offs < L)
    tl.debug_barrier()
    outside = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k, k_ok, v, ok = id_block(ids_ptr, n, sin, sik, k0, K, L, BLOCK_K)
        outside = tl.maximum(outside, (k_ok & ~ok).to(tl.int32))
        tl.atomic_min(code_row + v, k.to(tl.int32), mask=ok)
    tl.debug_barrier()
    repeats = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k, k_ok, v, ok = id_block(ids_ptr, n, sin, sik, k0, K, L, BLOCK_K)
        first = tl.load(code_row + v, mask=ok, other=0, volatile=True)  # the winner of the atomic min
        repeats = tl.maximum(repeats, (ok & (first != k)).to(tl.int32))
    has_repeats = tl.max(repeats, axis=0)
    if has_repeats > 0:
        for a0 in range(0, K, BLOCK_C):
            ka, a_ok, va, ok = id_block(ids_ptr, n, sin, sik, a0, K, L, BLOCK_C)
            best = tl.full([BLOCK_C], 2147483647, tl.int32)
            for b0 in range(a0, K, BLOCK_C):
                kb, b_ok, vb, _ = id_block(ids_ptr, n, sin, sik, b0, K, L, BLOCK_C)
                same = (va[:, None] == vb[None, :]) & b_ok[None, :] & (kb[None, :] > ka[:, None])
                best = tl.minimum(best, tl.min(tl.where(same, kb[None, :], 2147483647), axis=1))
            nxt = tl.where(best == 2147483647, -1, best)
            tl.store(nxt_ptr + n * K + ka, nxt, mask=a_ok)
            first = tl.load(code_row + va, mask=ok, other=-1, volatile=True)
            # the first of a chain is marked; a later element reads -(k + 1) or k, never itself
            tl.store(code_row + va, -(ka + 1), mask=ok & (first == ka) & (nxt >= 0))
        tl.debug_barrier()
    return has_repeats + 2 * tl.max(outside, axis=0)


@triton.jit
def index_map_kernel(ids_ptr, code_ptr, nxt_ptr, K, L, sin, sik,
                     BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per sample: :func:`build_map` of ids [N, K] (strided) into code [N, L], nxt [N, K]."""
    build_map(ids_ptr, code_ptr, nxt_ptr, tl.program_id(0).to(tl.int64), K, L, sin, sik,
              BLOCK_K=BLOCK_K, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)


@triton.jit
def first_and_chain(code, nxt_row_ptr, ok):
    """Decode code values (int32 tensor) read where ``ok``: (k int64, hit, next k int32 or -1)."""
    k = tl.where(code < 0, -code - 1, code).to(tl.int64)
    hit = ok & (code < 2147483647)
    nk = tl.load(nxt_row_ptr + k, mask=ok & (code < 0), other=-1)
    return k, hit, nk
