"""resized_crop: the torch path is Pillow's bicubic resize exactly (RandomResizedCrop boxes, odd sizes, flips);
the Triton kernel agrees with it to one 8-bit level on a small fraction of values, fp32 and bf16; metadata out
of range gives a NaN image unchecked and a named error checked; bad arguments; GPU sizes."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import data, ops
from mae_fast.ops.resized_crop import pack_images

rc = importlib.import_module("mae_fast.ops.resized_crop")  # the module (ops.resized_crop is the function)

MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD
LEVEL = 1 / (255 * min(STD))  # one 8-bit level after normalisation, at most


def photo(k: int, max_side: int) -> np.ndarray:
    """Sample photograph k (of 10), scaled so its long side is at most max_side: uint8 [H, W, 3]."""
    im = data.load_rgb(data.sample_images()[k % 10])
    s = min(1.0, max_side / max(im.size))
    return np.asarray(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC))


def noise(H: int, W: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def batch(arrays, boxes, flips):
    pixels, offsets, shapes = pack_images([torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous() for a in arrays])
    return pixels, offsets, shapes, torch.tensor(boxes, dtype=torch.int64).view(-1, 4), torch.tensor(flips)


def pillow(arrays, boxes, flips, size):
    """The CPU loader's samples: Pillow's resize with the box, the flip, to_tensor."""
    out = []
    for a, box, flip in zip(arrays, boxes, flips):
        im = Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC, box=box)
        out.append(data.to_tensor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im))
    return torch.stack(out)


def rrc(arrays, seed=0):
    """RandomResizedCrop boxes and flips for the arrays, as the loaders draw them."""
    drawn = [data.crop_and_flip(seed, k, a.shape[1], a.shape[0]) for k, a in enumerate(arrays)]
    return [b for b, _ in drawn], [f for _, f in drawn]


@pytest.mark.parametrize("size", [1, 7, 32, 224])
def test_torch_path_is_pillow(torch_path, size):
    """Bit for bit the CPU loader's samples: photographs at full size and small, odd and degenerate images, wide
    and tall (Pillow 13 takes the vertical pass first for these)."""
    arrays = [photo(k, 600 if k < 4 else 37) for k in range(8)]
    arrays += [noise(1, 1, 0), noise(1, 9, 1), noise(13, 1, 2), noise(3, 200, 3), noise(31, 17, 4), noise(90, 11, 5)]
    boxes, flips = rrc(arrays, seed=size)
    out = ops.resized_crop(*batch(arrays, boxes, flips), size, mean=MEAN, std=STD)
    assert out.shape == (len(arrays), 3, size, size) and out.dtype == torch.float32
    assert torch.equal(out, pillow(arrays, boxes, flips, size))


def test_torch_path_whole_image_and_upscale(torch_path):
    """A box that is the whole image at its own size is the image; a 2x2 box blown up to 9x9 is Pillow's."""
    a = noise(8, 8, 5)
    same = ops.resized_crop(*batch([a], [(0, 0, 8, 8)], [False]), 8, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert torch.equal(same[0].round().to(torch.uint8), torch.from_numpy(a).permute(2, 0, 1))
    up = ops.resized_crop(*batch([a], [(3, 2, 5, 4)], [True]), 9, mean=MEAN, std=STD)
    assert torch.equal(up, pillow([a], [(3, 2, 5, 4)], [True], 9))


def kernel_case(seed=0):
    """Tiny images with boxes of every kind: RandomResizedCrop, thin, upscaled, at the edges, the whole image."""
    arrays = [photo(seed, 24), photo(seed + 3, 17), noise(1, 1, seed), noise(9, 23, seed), noise(21, 6, seed)]
    boxes, flips = rrc(arrays, seed)
    boxes[3], boxes[4] = (20, 1, 23, 9), (0, 0, 6, 21)  # a thin strip at the right edge (x8 vertically), everything
    flips[3], flips[4] = True, False
    return arrays, boxes, flips


def test_both_pass_orders_are_tested():
    """Pillow 13 resizes a tall image with the vertical pass first: kernel_case holds images of both orders."""
    arrays, _, _ = kernel_case()
    orders = {rc.vertical_first(a.shape[0], a.shape[1], size) for a in arrays for size in (5, 8)}
    assert orders == ({True, False} if rc.VERTICAL_FIRST else {False})


@pytest.mark.parametrize("size", [5, 8])
def test_kernel_matches_torch_path(triton_path, size):
    arrays, boxes, flips = kernel_case(size)
    args = batch(arrays, boxes, flips)
    out = ops.resized_crop(*args, size, mean=MEAN, std=STD)
    with ops.path("torch"):
        ref = ops.resized_crop(*args, size, mean=MEAN, std=STD)
    diff = (out - ref).abs()
    assert diff.max() <= LEVEL * 1.0001  # fp32 weights where Pillow's are 22-bit fixed point: a rounding may flip
    assert (diff > 0).float().mean() <= 0.01
    assert triton_path.get("resized_crop_kernel") == 1  # the whole batch in one launch


def test_kernel_bf16(triton_path):
    arrays, boxes, flips = kernel_case(1)
    args = batch(arrays[2:4], boxes[2:4], flips[2:4])
    fp32 = ops.resized_crop(*args, 6, mean=MEAN, std=STD)
    bf16 = ops.resized_crop(*args, 6, mean=MEAN, std=STD, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    ulp = fp32.abs().clamp(min=2**-126) * 2**-7  # one bf16 ulp (the interpreter truncates where CUDA rounds)
    assert ((bf16.float() - fp32).abs() <= ulp).all()


def test_bad_metadata_unchecked_gives_nan_images(each_path):
    """Unchecked, metadata that does not describe an image gives that image NaN on every path; the rest is intact."""
    arrays = [noise(6, 7, 0), noise(5, 4, 1)] * 3
    pixels, offsets, shapes, boxes, flips = batch(arrays, [(0, 0, 7, 6), (0, 0, 4, 5)] * 3, [False] * 6)
    boxes[1] = torch.tensor([0, 0, 5, 5])  # right edge past the image
    offsets[2] = pixels.numel() - 10  # planes past the buffer
    shapes[3] = torch.tensor([0, 4])  # an empty image
    boxes[4] = torch.tensor([2, 1, 2, 3])  # an empty box
    out = ops.resized_crop(pixels, offsets, shapes, boxes, flips, 4, mean=MEAN, std=STD, check=False)
    assert out[1:5].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[5]).all()
    with ops.path("torch"):
        ref = ops.resized_crop(*batch(arrays[:1], [(0, 0, 7, 6)], [False]), 4, mean=MEAN, std=STD)
    assert (out[0] - ref[0]).abs().max() <= LEVEL * 1.0001


@pytest.mark.parametrize("field,value,msg", [
    ("boxes", (0, 0, 8, 5), r"boxes\[1\] = \(0, 0, 8, 5\) is not a non-empty box inside its 7x6 image"),
    ("boxes", (3, 2, 3, 4), r"boxes\[1\]"),
    ("shapes", (0, 7), r"shapes\[1\] = \(0, 7\) is not an image size"),
    ("offsets", 200, r"offsets\[1\] = 200: its 3 x 6 x 7 pixels do not lie inside pixels \(252 bytes\)"),
])
def test_checked_metadata_names_the_image(field, value, msg):
    args = list(batch([noise(6, 7, 0)] * 2, [(0, 0, 7, 6)] * 2, [False] * 2))
    idx = {"offsets": 1, "shapes": 2, "boxes": 3}[field]
    args[idx][1] = torch.tensor(value)
    with pytest.raises(ValueError, match=msg):
        ops.resized_crop(*args, 4, mean=MEAN, std=STD)  # CPU tensors: checked by default


def test_bad_arguments():
    pixels, offsets, shapes, boxes, flips = batch([noise(6, 7, 0)], [(0, 0, 7, 6)], [False])
    kw = dict(mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="pixels must have dtype in"):
        ops.resized_crop(pixels.float(), offsets, shapes, boxes, flips, 4, **kw)
    with pytest.raises(TypeError, match="offsets must have dtype in"):
        ops.resized_crop(pixels, offsets.int(), shapes, boxes, flips, 4, **kw)
    with pytest.raises(ValueError, match=r"boxes must have shape \[1, 4\]"):
        ops.resized_crop(pixels, offsets, shapes, boxes[:, :3], flips, 4, **kw)
    with pytest.raises(ValueError, match=r"flips must have shape \[1\]"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips.repeat(2), 4, **kw)
    with pytest.raises(TypeError, match="flips must have dtype in"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips.long(), 4, **kw)
    with pytest.raises(ValueError, match="size must be a positive int"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips, 0, **kw)
    with pytest.raises(ValueError, match="std must be positive"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips, 4, mean=MEAN, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips, 4, mean=(0.5, 0.5), std=STD)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ops.resized_crop(pixels, offsets, shapes, boxes, flips, 4, dtype=torch.float64, **kw)
    with pytest.raises(ValueError, match="must have 3 channels"):
        pack_images([torch.zeros(1, 4, 4, dtype=torch.uint8)])
    assert ops.resized_crop(pixels, offsets[:0], shapes[:0], boxes[:0], flips[:0], 4, **kw).shape == (0, 3, 4, 4)


def test_inputs_untouched_and_registered(record_ops):
    args = batch([noise(6, 7, 0)], [(1, 0, 7, 5)], [True])
    before = [t.clone() for t in args]
    with record_ops() as rec:
        ops.resized_crop(*args, 4, mean=MEAN, std=STD)
    assert "resized_crop" in rec.calls
    assert all(torch.equal(a, b) for a, b in zip(args, before))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_size(dtype):
    """ImageNet-sized images to 224 px on CUDA (both pass orders), against Pillow."""
    smooth = [np.asarray(Image.fromarray(noise(6, 8, k)).resize(wh, Image.Resampling.BICUBIC))
              for k, wh in enumerate([(500, 375), (375, 500), (333, 500), (640, 480)] * 3)]
    arrays = smooth + [noise(375, 500, 7), noise(1, 1, 8)]
    boxes, flips = rrc(arrays, seed=3)
    args = batch(arrays, boxes, flips)
    ref = pillow(arrays, boxes, flips, 224)
    out = ops.resized_crop(*[t.cuda() for t in args], 224, mean=MEAN, std=STD, dtype=dtype).float().cpu()
    diff = (out - ref).abs()
    tol = LEVEL * 1.0001 + (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)  # bf16: half an ulp on top
    assert (diff <= tol).all()
    assert (diff > (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)).float().mean() <= 1e-3
