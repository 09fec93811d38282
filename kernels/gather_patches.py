"""Triton kernels: raw pixels of the visible patches in the (C, p, p) order of a flattened Conv2d weight.

Forward:  imgs [N, C, H, W], ids_keep [N, K] -> out [N, K, C*p*p]
          out[n, k, c*p*p + i*p + j] = imgs[n, c, ph*p + i, pw*p + j],  (ph, pw) = divmod(ids_keep[n, k], W/p)
Backward: one program per (patch of the image grid, E block): grad_imgs is written exactly once, from the
          visible patch's gradient row or zeros (inverse map inv [N, L]: k or -1), so no atomics.
"""
import triton
import triton.language as tl


@triton.jit
def gather_patches_fwd_kernel(
    img_ptr, ids_ptr, out_ptr,
    R, K, E, WP,  # R = N*K rows, E = C*p*p, WP = W // p
    sin, sic, sih, siw,
    sdn, sdk,
    PATCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < R
    e_ok = e < E
    n = rows // K
    k = rows % K
    t = tl.load(ids_ptr + n * sdn + k * sdk, mask=row_ok, other=0).to(tl.int64)  # [BR] patch index
    ph = t // WP
    pw = t % WP
    c = e // (PATCH * PATCH)
    i = (e // PATCH) % PATCH
    j = e % PATCH
    src = (n * sin + ph * (PATCH * sih) + pw * (PATCH * siw))[:, None] + (c * sic + i * sih + j * siw)[None, :]
    m = row_ok[:, None] & e_ok[None, :]
    v = tl.load(img_ptr + src, mask=m, other=0.0)
    tl.store(out_ptr + rows[:, None] * E + e[None, :], v, mask=m)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr, inv_ptr, gi_ptr,
    R, L, E, WP, H, W,  # R = N*L patches of the grid
    sgn, sgk, sge,
    PATCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64: n*L + t
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < R
    e_ok = e < E
    n = rows // L
    t = rows % L
    k = tl.load(inv_ptr + rows, mask=row_ok, other=-1).to(tl.int64)  # [BR] -1: removed patch
    hit = k >= 0
    g = tl.load(g_ptr + (n * sgn + k * sgk)[:, None] + e[None, :] * sge,
                mask=hit[:, None] & e_ok[None, :], other=0.0)
    ph = t // WP
    pw = t % WP
    c = e // (PATCH * PATCH)
    i = (e // PATCH) % PATCH
    j = e % PATCH
    # grad_imgs is contiguous [N, C, H, W]
    dst = (n * E * L + ph * (PATCH * W) + pw * PATCH)[:, None] + (c * (H * W) + i * W + j)[None, :]
    tl.store(gi_ptr + dst, g.to(gi_ptr.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])


def blocks(E: int):
    """(BLOCK_R, BLOCK_E, num_warps): 256-wide blocks over C*p*p (768 for p=16, C=3), several patches each."""
    block_e = min(256, triton.next_power_of_2(E))
    return max(1, 4096 // block_e), block_e, 4
