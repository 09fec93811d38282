"""Triton kernels: raw pixels of the visible patches (tubelets) in the (C, u, p, p) order of a flattened
Conv3d weight ((C, p, p), a flattened Conv2d weight, for images: u = 1).

Forward:  imgs [N, C, T, H, W] (an image [N, C, H, W] is T = u = 1, time stride 0), ids_keep [N, K]
          -> out [N, K, C*u*p*p]
          out[n, k, ((c*u + f)*p + i)*p + j] = imgs[n, c, s*u + f, r*p + i, q*p + j]
          with token ids_keep[n, k] = (s, r, q): s = l // (h*w), r = (l % (h*w)) // w, q = l % w
          A token id outside [0, L) names no patch: its row is NaN (no out-of-bounds or other-sample read,
          no extra bytes: the range test masks the load it already guards).
Backward: one program per (token of the grid, E block): grad_imgs is written exactly once, from the
          visible token's gradient row or zeros (inverse map code [N, L] of ``index_map.py``), so no
          atomics; a token named by several rows gets the sum over its chain, in ascending k.
"""
import triton
import triton.language as tl

from ._tiles import column_block, indexed_rows
from .index_map import first_and_chain


@triton.jit
def gather_patches_fwd_kernel(
    img_ptr, ids_ptr, out_ptr,
    R, K, E, WP, HWP, L,  # R = N*K rows, E = C*u*p*p, WP = W // p, HWP = (H // p) * (W // p) tokens per slot
    sin, sic, sit, sih, siw,  # sit: time stride (0 for an image)
    sdn, sdk,
    PATCH: tl.constexpr, TUBE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows, row_ok, n, _, _, t, t_ok = indexed_rows(ids_ptr, sdn, sdk, R, K, 0, L, BLOCK_R)  # [BR] token index
    e, e_ok = column_block(BLOCK_E, E)  # [BE]
    s = t // HWP  # tubelet slot in time
    ph = (t % HWP) // WP
    pw = t % WP
    c = e // (TUBE * PATCH * PATCH)
    f = (e // (PATCH * PATCH)) % TUBE  # frame within the tubelet
    i = (e // PATCH) % PATCH
    j = e % PATCH
    base = n * sin + s * (TUBE * sit) + ph * (PATCH * sih) + pw * (PATCH * siw)  # [BR]
    src = base[:, None] + (c.to(tl.int64) * sic + f * sit + i * sih + j * siw)[None, :]
    m = row_ok[:, None] & e_ok[None, :]
    v = tl.load(img_ptr + src, mask=m & t_ok[:, None], other=0.0)
    v = tl.where(t_ok[:, None], v, float("nan"))
    tl.store(out_ptr + rows[:, None] * E + e[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr, code_ptr, nxt_ptr, gi_ptr,
    R, L, K, E, WP, HWP, T, H, W,  # R = N*L tokens of the grid, K ids per sample, T frames (1 for an image)
    sgn, sgk, sge,
    PATCH: tl.constexpr, TUBE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64: n*L + t
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < R
    e_ok = e < E
    n = rows // L
    t = rows % L
    code = tl.load(code_ptr + rows, mask=row_ok, other=2147483647)  # [BR]
    k, hit, nk = first_and_chain(code, nxt_ptr + n * K, row_ok)  # no hit: a removed token
    g = tl.load(g_ptr + (n * sgn + k * sgk)[:, None] + e[None, :] * sge,
                mask=hit[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    while tl.max(nk, axis=0) >= 0:  # only where ids repeat a token
        more = nk >= 0
        k2 = nk.to(tl.int64)
        g += tl.load(g_ptr + (n * sgn + k2 * sgk)[:, None] + e[None, :] * sge,
                     mask=more[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        nk = tl.load(nxt_ptr + n * K + k2, mask=more, other=-1)
    s = t // HWP
    ph = (t % HWP) // WP
    pw = t % WP
    c = e // (TUBE * PATCH * PATCH)
    f = (e // (PATCH * PATCH)) % TUBE
    i = (e // PATCH) % PATCH
    j = e % PATCH
    # grad_imgs is contiguous [N, C, T, H, W] (n * E * L = n * C*T*H*W)
    base = n * E * L + s * (TUBE * H * W) + ph * (PATCH * W) + pw * PATCH  # [BR]
    dst = base[:, None] + (c.to(tl.int64) * T * H * W + f * (H * W) + i * W + j)[None, :]
    tl.store(gi_ptr + dst, g.to(gi_ptr.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
