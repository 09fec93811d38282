"""resized_crop: training samples from a batch of decoded images of different sizes, in one pass.

``out = resized_crop(pixels, offsets, shapes, boxes, flips, size, mean=..., std=...)``: image n is the uint8
planes [3, H, W] (``shapes[n] = (H, W)``) stored contiguously from ``pixels[offsets[n]]`` of a flat uint8
buffer (:func:`pack_images` makes one from a list). Its box ``boxes[n] = (left, top, right, bottom)`` is
resized to size x size with Pillow's antialiased bicubic filter (what ``Image.resize(size, BICUBIC,
box=box)`` does, in the installed Pillow's order of passes: :func:`vertical_first`), flipped left-right where
``flips[n]``, and normalised:
out [N, 3, size, size] = (level / 255 - mean[c]) / std[c] in ``dtype`` (fp32, bf16 or fp16).
Not differentiable (the input is 8-bit data). Kernel: ``kernels/resized_crop.py`` (fp32); plain torch path:
:func:`resized_crop_torch` (Pillow's integer arithmetic, so its levels are Pillow's). The kernel agrees with it
to one 8-bit level, on a few values in a hundred thousand (docs/PRETRAIN.md gives the measurements).

Metadata that does not describe an image inside ``pixels`` (a box outside its image, an offset past the
buffer) is an error when the checks run (CPU tensors, or ``check=True``; ``MAE_FAST_CHECK_INDICES=1``);
unchecked, that image's output is NaN on every path, and nothing is read outside the buffer.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import PIL
import torch
import triton
from torch import Tensor

from mae_fast.kernels import resized_crop as _k

from ._checks import check_indices_enabled, check_tensor
from ._op import register_op
from ._triton import launch
from .paths import use_triton

__all__ = ["resized_crop", "resized_crop_torch", "pack_images", "OUT_DTYPES"]

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SIDE = 1 << 24  # image sides beyond this are refused (fp32 coordinates stay exact to a pixel)
BLOCK_Y, BLOCK_X, BLOCK_K = 8, 128, 8
PRECISION_BITS = 22  # Pillow's fixed-point weights of an 8-bit resize (32 - 8 - 2)
VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13  # the installed Pillow's order of the two passes


def _valid_images(pixels: Tensor, offsets: Tensor, shapes: Tensor, boxes: Tensor) -> Tensor:
    """[N] bool: image n's metadata describes pixels inside the buffer and a non-empty box inside the image."""
    H, W = shapes[:, 0], shapes[:, 1]
    left, top, right, bottom = boxes.unbind(1)
    sides = (H >= 1) & (W >= 1) & (H <= MAX_SIDE) & (W <= MAX_SIDE)
    box = (left >= 0) & (top >= 0) & (left < right) & (top < bottom) & (right <= W) & (bottom <= H)
    room = (offsets >= 0) & (offsets + 3 * H.clamp(0, MAX_SIDE) * W.clamp(0, MAX_SIDE) <= pixels.numel())
    return sides & box & room


def _bicubic(t: Tensor) -> Tensor:
    """Pillow's bicubic kernel (Keys, a = -0.5)."""
    t = t.abs()
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * -0.5
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def _taps(lo: int, hi: int, extent: int, size: int, device) -> Tuple[Tensor, Tensor]:
    """One axis of Pillow's resize: (input index [size, K], fixed-point weights [size, K] int64, scaled by
    2**22). Pillow's precompute_coeffs and normalize_coeffs_8bpc, operation for operation in float64; taps
    past an output pixel's window weigh 0 (their index stays valid)."""
    scale = (hi - lo) / size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    center = lo + (torch.arange(size, dtype=torch.float64, device=device) + 0.5) * scale  # [size]
    first = torch.floor(center - support + 0.5).clamp(min=0)
    last = torch.floor(center + support + 0.5).clamp(max=extent)
    K = 2 * math.ceil(support) + 1
    idx = first[:, None] + torch.arange(K, dtype=torch.float64, device=device)  # [size, K]
    w = _bicubic((idx - center[:, None] + 0.5) * (1.0 / stretch)) * (idx < last[:, None])
    total = w.cumsum(1)[:, -1:]  # summed in tap order, as Pillow
    w = w / torch.where(total != 0, total, torch.ones_like(total))
    fixed = torch.trunc(w * (1 << PRECISION_BITS) + torch.where(w < 0, -0.5, 0.5))  # C's (int) cast: toward 0
    return idx.clamp(max=extent - 1).long(), fixed.long()


def _round_levels(acc: Tensor) -> Tensor:
    """A fixed-point sum -> 8-bit levels: add one half, shift, clip (Pillow's clip8)."""
    return ((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255)


def vertical_first(H: int, W: int, size: int) -> bool:
    """Whether Pillow resizes an H x W image to size x size with the vertical pass first: Pillow 13 and later
    do when the height shrinks by more than twice what the width does (S < H and H - S > 2 (W - S)); earlier
    versions never. The two orders differ only in the rounding of the 8-bit intermediate."""
    return VERTICAL_FIRST and size < H and H - size > 2 * (W - size)


def _one_image(planes: Tensor, box: Sequence[int], size: int) -> Tensor:
    """uint8 [3, H, W] and a box -> the resized box, 8-bit levels as int64 [3, size, size]: exactly Pillow's
    ``resize((size, size), BICUBIC, box=box)`` (two passes with an 8-bit intermediate, in Pillow's order)."""
    _, H, W = planes.shape
    left, top, right, bottom = box
    ix, wx = _taps(left, right, W, size, planes.device)  # [size, Kx]
    iy, wy = _taps(top, bottom, H, size, planes.device)  # [size, Ky]
    if vertical_first(H, W, size):
        cols = torch.unique(ix[wx != 0])  # the input columns the horizontal pass reads
        img = planes[:, :, cols].long()  # [3, H, C]
        v = _round_levels((img[:, iy, :] * wy[:, :, None]).sum(2))  # [3, size, C]: the 8-bit intermediate
        at = torch.searchsorted(cols, ix).clamp(max=cols.numel() - 1)  # [size, Kx] columns of v
        return _round_levels((v[:, :, at] * wx).sum(-1))  # [3, size, size]
    rows = torch.unique(iy[wy != 0])  # the input rows the vertical pass reads
    img = planes[:, rows].long()  # [3, R, W]
    h = _round_levels((img[:, :, ix] * wx).sum(-1))  # [3, R, size]: the 8-bit intermediate
    at = torch.searchsorted(rows, iy).clamp(max=rows.numel() - 1)  # [size, Ky] rows of h (0-weight taps: any)
    return _round_levels((h[:, at] * wy[:, :, None]).sum(2))  # [3, size, size]


def resized_crop_torch(pixels: Tensor, offsets: Tensor, shapes: Tensor, boxes: Tensor, flips: Tensor, size: int,
                       mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> Tensor:
    """Plain torch path (the CPU path and the oracle): Pillow's resize exactly (its float64 weights in 22-bit
    fixed point, integer sums), then the normalisation in fp32 (as ``mae_fast.data.to_tensor``)."""
    N = offsets.shape[0]
    out = torch.empty((N, 3, size, size), dtype=dtype, device=pixels.device)
    valid = _valid_images(pixels, offsets, shapes, boxes).tolist()
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    for n in range(N):
        if not valid[n]:
            out[n] = float("nan")
            continue
        H, W = (int(v) for v in shapes[n])
        o = int(offsets[n])
        level = _one_image(pixels[o:o + 3 * H * W].view(3, H, W), [int(v) for v in boxes[n]], size)
        if bool(flips[n]):
            level = level.flip(-1)
        out[n] = ((level.float() / 255 - m) / s).to(dtype)  # [3, size, size]
    return out


@register_op("resized_crop")
def _resized_crop(pixels: Tensor, offsets: Tensor, shapes: Tensor, boxes: Tensor, flips: Tensor, size: int,
                  mean: List[float], std: List[float], dtype: torch.dtype) -> Tensor:
    if not use_triton(pixels):
        return resized_crop_torch(pixels, offsets, shapes, boxes, flips, size, mean, std, dtype)
    N = offsets.shape[0]
    out = torch.empty((N, 3, size, size), dtype=dtype, device=pixels.device)  # [N, 3, S, S]
    if N == 0:
        return out
    block_x = min(BLOCK_X, max(16, 1 << (size - 1).bit_length()))
    launch(_k.resized_crop_kernel)[(3 * N, triton.cdiv(size, BLOCK_Y), triton.cdiv(size, block_x))](
        pixels, offsets, shapes, boxes, flips, out, size, pixels.numel(), MAX_SIDE, *mean, *std,  # fp32 scalars
        VERTICAL_FIRST=VERTICAL_FIRST, BLOCK_Y=BLOCK_Y, BLOCK_X=block_x, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out


def _check_metadata(pixels: Tensor, offsets: Tensor, shapes: Tensor, boxes: Tensor) -> None:
    """ValueError naming the argument of the first image whose metadata is out of range (reads the values)."""
    bad = (~_valid_images(pixels, offsets, shapes, boxes)).nonzero()
    if not bad.numel():
        return
    n = int(bad[0])
    H, W = (int(v) for v in shapes[n])
    if not (1 <= H <= MAX_SIDE and 1 <= W <= MAX_SIDE):
        raise ValueError(f"shapes[{n}] = ({H}, {W}) is not an image size (sides 1 to {MAX_SIDE})")
    left, top, right, bottom = (int(v) for v in boxes[n])
    if not (0 <= left < right <= W and 0 <= top < bottom <= H):
        raise ValueError(f"boxes[{n}] = ({left}, {top}, {right}, {bottom}) is not a non-empty box inside its "
                         f"{W}x{H} image (0 <= left < right <= W, 0 <= top < bottom <= H)")
    raise ValueError(f"offsets[{n}] = {int(offsets[n])}: its 3 x {H} x {W} pixels do not lie inside pixels "
                     f"({pixels.numel()} bytes)")


def resized_crop(pixels: Tensor, offsets: Tensor, shapes: Tensor, boxes: Tensor, flips: Tensor, size: int, *,
                 mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32,
                 check: Optional[bool] = None) -> Tensor:
    """Crop, resize (Pillow's bicubic), flip and normalise N images of different sizes -> [N, 3, size, size].

    pixels: uint8 [T], the images' planes [3, H, W] back to back (any order, see :func:`pack_images`);
    offsets: int64 [N]; shapes: int64 [N, 2] (H, W); boxes: int64 [N, 4] (left, top, right, bottom), pixel
    edges as Pillow's ``box``; flips: bool [N]; all on one device. mean, std: 3 numbers each (per channel,
    on the 0-1 scale); dtype: the output's (fp32, bf16 or fp16). ``check``: read the metadata's values and
    raise for out-of-range ones (default: on for CPU tensors; a device sync on CUDA).
    """
    check_tensor("pixels", pixels, ndim=1, dtypes=(torch.uint8,))
    dev = pixels.device
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,), device=dev)
    N = offsets.shape[0]
    for name, t, width in (("shapes", shapes, 2), ("boxes", boxes, 4)):
        check_tensor(name, t, ndim=2, dtypes=(torch.int64,), device=dev)
        if tuple(t.shape) != (N, width):
            raise ValueError(f"{name} must have shape [{N}, {width}] (N from offsets), got {list(t.shape)}")
    check_tensor("flips", flips, ndim=1, dtypes=(torch.bool,), device=dev)
    if flips.shape[0] != N:
        raise ValueError(f"flips must have shape [{N}] (N from offsets), got {list(flips.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    stats = []
    for name, v in (("mean", mean), ("std", std)):
        try:
            v = [float(x) for x in v]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be 3 numbers, got {v!r}") from None
        if len(v) != 3 or not all(math.isfinite(x) for x in v):
            raise ValueError(f"{name} must be 3 finite numbers, got {v}")
        stats.append(v)
    if not all(x > 0 for x in stats[1]):
        raise ValueError(f"std must be positive, got {stats[1]}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d).replace('torch.', '') for d in OUT_DTYPES]}, got {dtype}")
    if check_indices_enabled(check, dev):
        _check_metadata(pixels, offsets.contiguous(), shapes.contiguous(), boxes.contiguous())
    return _resized_crop(pixels.contiguous(), offsets.contiguous(), shapes.contiguous(), boxes.contiguous(),
                         flips.contiguous(), size, stats[0], stats[1], dtype)


def pack_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """uint8 images [3, H, W] (one device) -> (pixels [T], offsets [N] int64, shapes [N, 2] int64): the
    layout :func:`resized_crop` reads, one copy."""
    if not images:
        raise ValueError("images must hold at least one image")
    for i, im in enumerate(images):
        check_tensor(f"images[{i}]", im, ndim=3, dtypes=(torch.uint8,), device=images[0].device)
        if im.shape[0] != 3:
            raise ValueError(f"images[{i}] must have 3 channels ([3, H, W]), got shape {list(im.shape)}")
    sizes = [im.numel() for im in images]
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    pixels = torch.cat([im.reshape(-1) for im in images])  # [T]
    offsets = torch.tensor(starts, dtype=torch.int64).to(images[0].device)
    shapes = torch.tensor([list(im.shape[1:]) for im in images], dtype=torch.int64).to(images[0].device)
    return pixels, offsets, shapes
