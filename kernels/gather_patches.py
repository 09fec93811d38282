"""Triton kernels: raw pixels of the visible patches (tubelets) in the (C, u, p, p) order of a flattened
Conv3d weight ((C, p, p), a flattened Conv2d weight, for images: u = 1).

Forward:  imgs [N, C, T, H, W] (an image [N, C, H, W] is T = u = 1, time stride 0), ids_keep [N, K]
          -> out [N, K, C*u*p*p]
          out[n, k, ((c*u + f)*p + i)*p + j] = imgs[n, c, s*u + f, r*p + i, q*p + j]
          with token ids_keep[n, k] = (s, r, q): s = l // (h*w), r = (l % (h*w)) // w, q = l % w
Backward: one program per (token of the grid, E block): grad_imgs is written exactly once, from the
          visible token's gradient row or zeros (inverse map inv [N, L]: k or -1), so no atomics.
"""
import triton
import triton.language as tl


@triton.jit
def gather_patches_fwd_kernel(
    img_ptr, ids_ptr, out_ptr,
    R, K, E, WP, HWP,  # R = N*K rows, E = C*u*p*p, WP = W // p, HWP = (H // p) * (W // p) tokens per slot
    sin, sic, sit, sih, siw,  # sit: time stride (0 for an image)
    sdn, sdk,
    PATCH: tl.constexpr, TUBE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < R
    e_ok = e < E
    n = rows // K
    k = rows % K
    t = tl.load(ids_ptr + n * sdn + k * sdk, mask=row_ok, other=0).to(tl.int64)  # [BR] token index
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
    v = tl.load(img_ptr + src, mask=m, other=0.0)
    tl.store(out_ptr + rows[:, None] * E + e[None, :], v, mask=m)


@triton.jit
def gather_patches_bwd_kernel(
    g_ptr, inv_ptr, gi_ptr,
    R, L, E, WP, HWP, T, H, W,  # R = N*L tokens of the grid, T frames (1 for an image)
    sgn, sgk, sge,
    PATCH: tl.constexpr, TUBE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64: n*L + t
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < R
    e_ok = e < E
    n = rows // L
    t = rows % L
    k = tl.load(inv_ptr + rows, mask=row_ok, other=-1).to(tl.int64)  # [BR] -1: removed token
    hit = k >= 0
    g = tl.load(g_ptr + (n * sgn + k * sgk)[:, None] + e[None, :] * sge,
                mask=hit[:, None] & e_ok[None, :], other=0.0)
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
