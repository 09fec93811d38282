"""Triton kernel: a batch of training samples from decoded images of different sizes, in one launch.

For image n (uint8 planes [3, H, W] at ``offsets[n]`` of a flat buffer) and its box (left, top, right,
bottom): crop the box, resize it to S x S with Pillow's antialiased bicubic filter (a = -0.5; when
shrinking by s > 1 the filter is stretched by s, so it spans 4 s input pixels), flip left-right when
``flips[n]``, and write (level / 255 - mean[c]) / std[c] into out [N, 3, S, S] (out's dtype).

The resize is Pillow's ``Image.resize(..., BICUBIC, box=...)`` in fp32: two separable passes, the first
rounded half up and clipped to an 8-bit level (Pillow keeps it as uint8), the second rounded and clipped
the same way. Taps reach outside the box where the image has pixels, clipped at the image's border, and
each output pixel's weights are normalised by their sum, as Pillow does. The horizontal pass comes first,
except where Pillow 13 and later take the vertical one first (``VERTICAL_FIRST``: when S < H and
H - S > 2 (W - S)).
Programs: (image x channel, block of BLOCK_Y output rows, block of BLOCK_X output columns). A program walks
the input lines (rows, or columns when the vertical pass is first) its outputs need; for each it resamples
the line at its outputs of the first pass (taps BLOCK_K at a time) and adds it, weighted, into every
output whose window holds it. Addresses are int64 (a batch of large images passes 2**31 bytes). An image
whose metadata is out of range (sides outside [1, max_side], a box not inside the image, planes not
inside the ``total`` bytes) reads nothing and comes out NaN.
"""
import triton
import triton.language as tl


@triton.jit
def _bicubic(t):
    """Pillow's bicubic kernel (Keys, a = -0.5) at t, fp32."""
    t = tl.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0  # (a + 2) t^3 - (a + 3) t^2 + 1
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * -0.5  # a (t^3 - 5 t^2 + 8 t - 4)
    return tl.where(t < 1.0, near, tl.where(t < 2.0, far, 0.0))


@triton.jit
def _axis(o, lo, hi, extent, S):
    """One axis of the resize for output positions ``o`` from the box [lo, hi) of an axis of ``extent``
    pixels: (centre of each output pixel in input coordinates, its first tap, its number of taps, 1 / the
    filter's stretch). Pillow's precompute_coeffs, in fp32."""
    scale = (hi - lo).to(tl.float32) / S
    stretch = tl.maximum(scale, 1.0)
    support = 2.0 * stretch
    center = lo.to(tl.float32) + (o.to(tl.float32) + 0.5) * scale
    first = tl.maximum(tl.floor(center - support + 0.5), 0.0)
    last = tl.minimum(tl.floor(center + support + 0.5), extent.to(tl.float32))
    return center, first.to(tl.int32), (last - first).to(tl.int32), 1.0 / stretch


@triton.jit
def _round_level(v):
    """Pillow's clip8: round half up, clip to [0, 255]."""
    return tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0)


@triton.jit
def _two_passes(plane, stride_a, stride_b, fa, na, ca, ia, fb, nb, cb, ib,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pillow's resize at BLOCK_B x BLOCK_A outputs, first along axis a (input step ``stride_a``), then along
    axis b (input step ``stride_b``; one of the two is 1, the other the image's int64 width). Per output position of an axis: first tap f, number of taps n (0 for
    positions outside the output), centre c; i: 1 / the filter's stretch. Returns 8-bit levels [BLOCK_B, BLOCK_A]."""
    ks = tl.arange(0, BLOCK_K)
    ka = tl.max(na, axis=0)
    wsum_a = tl.zeros([BLOCK_A], dtype=tl.float32)  # each output's sum of first-pass weights
    for k0 in range(0, ka, BLOCK_K):
        k = k0 + ks
        w = _bicubic(((fa[:, None] + k[None, :]).to(tl.float32) - ca[:, None] + 0.5) * ia)  # [BA, BK]
        wsum_a += tl.sum(tl.where(k[None, :] < na[:, None], w, 0.0), axis=1)
    wsum_a = tl.where(wsum_a != 0.0, wsum_a, 1.0)
    line_lo = tl.min(tl.where(nb > 0, fb, 2147483647), axis=0)
    line_hi = tl.max(tl.where(nb > 0, fb + nb, 0), axis=0)
    acc = tl.zeros([BLOCK_B, BLOCK_A], dtype=tl.float32)
    wsum_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r in range(line_lo, line_hi):  # the input lines the second pass reads
        line = plane + r * stride_b  # strides are int64
        h = tl.zeros([BLOCK_A], dtype=tl.float32)
        for k0 in range(0, ka, BLOCK_K):
            k = k0 + ks
            on = k[None, :] < na[:, None]
            taps = fa[:, None] + k[None, :]  # [BA, BK] input positions along a
            w = _bicubic((taps.to(tl.float32) - ca[:, None] + 0.5) * ia)
            p = tl.load(line + taps * stride_a, mask=on, other=0).to(tl.float32)
            h += tl.sum(tl.where(on, w * p, 0.0), axis=1)
        h = _round_level(h / wsum_a)  # [BA]: Pillow's 8-bit intermediate
        wb = _bicubic((r - cb + 0.5) * ib)
        wb = tl.where((r >= fb) & (r < fb + nb), wb, 0.0)  # [BB]
        acc += wb[:, None] * h[None, :]
        wsum_b += wb
    return _round_level(acc / tl.where(wsum_b != 0.0, wsum_b, 1.0)[:, None])


@triton.jit
def resized_crop_kernel(
    src_ptr, offsets_ptr, shapes_ptr, boxes_ptr, flips_ptr, out_ptr, S, total, max_side, mean0, mean1, mean2,
    std0, std1, std2, VERTICAL_FIRST: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // 3
    c = pid % 3
    base = tl.load(offsets_ptr + n)  # int64
    H = tl.load(shapes_ptr + 2 * n)
    W = tl.load(shapes_ptr + 2 * n + 1)
    left = tl.load(boxes_ptr + 4 * n)
    top = tl.load(boxes_ptr + 4 * n + 1)
    right = tl.load(boxes_ptr + 4 * n + 2)
    bottom = tl.load(boxes_ptr + 4 * n + 3)
    flip = tl.load(flips_ptr + n)
    mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
    std = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))
    # metadata that does not describe a box inside an image inside the buffer: no reads, a NaN image
    Hc = tl.minimum(tl.maximum(H, 0), max_side)
    Wc = tl.minimum(tl.maximum(W, 0), max_side)
    ok = (H >= 1) & (W >= 1) & (H <= max_side) & (W <= max_side) & (left >= 0) & (top >= 0)
    ok = ok & (left < right) & (top < bottom) & (right <= W) & (bottom <= H) & (base >= 0)
    ok = ok & (base + 3 * Hc * Wc <= total)

    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)  # output columns [BX]
    x_ok = xs < S
    col = tl.where(flip, S - 1 - xs, xs)  # the column of the unflipped resize
    cx, fx, nx, ix = _axis(col, left, right, W, S)
    nx = tl.where(x_ok & ok, nx, 0)
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)  # output rows [BY]
    y_ok = ys < S
    cy, fy, ny, iy = _axis(ys, top, bottom, H, S)
    ny = tl.where(y_ok & ok, ny, 0)

    plane = src_ptr + base + c.to(tl.int64) * H * W
    vertical_first = (S < H) & (H - S > 2 * (W - S)) & VERTICAL_FIRST
    if vertical_first:  # lines are columns: down the rows first
        level = tl.trans(_two_passes(plane, W, 1, fy, ny, cy, iy, fx, nx, cx, ix, BLOCK_Y, BLOCK_X, BLOCK_K))
    else:  # lines are rows: along the columns first
        level = _two_passes(plane, 1, W, fx, nx, cx, ix, fy, ny, cy, iy, BLOCK_X, BLOCK_Y, BLOCK_K)  # [BY, BX]
    value = tl.math.div_rn(tl.math.div_rn(level, 255.0) - mean, std)  # IEEE division, as the CPU path
    value = tl.where(ok, value, float("nan"))
    dst = out_ptr + (n.to(tl.int64) * 3 + c) * S * S + ys[:, None].to(tl.int64) * S + xs[None, :]
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=y_ok[:, None] & x_ok[None, :])
