"""The two loaders: the GPU loader's CPU twin gives the CPU loader's samples (same images, boxes, flips, pixels);
unreadable files are replaced and reported once, the same with 0 and 1 workers on both loaders, never a crash;
a folder without a readable image is a one-line error; GPU: nvJPEG + the kernel against the CPU loader, and
the GPU loader's images/s."""
import itertools

import pytest
import torch

from mae_fast import data
from mae_fast.data import Batches, UnreadableImage


def take(paths, loader, workers, steps=3, batch=4, size=24, start_step=0, seed=0, **kw):
    skipped = []
    b = Batches(paths, size, batch, seed=seed, start_step=start_step, workers=workers, loader=loader,
                on_skip=lambda path, why: skipped.append(path), **kw)
    try:
        out = [next(b) for _ in range(steps)]
    finally:
        b.close()
    return out, skipped, b


def test_gpu_twin_gives_the_cpu_samples(tmp_path, files):
    """Over two epochs of a folder of every readable kind (JPEGs sent to the decoder, CMYK/PNG/16-bit/RGBA/palette
    decoded in the workers), from a resumed step: the CPU loader's batches, bit for bit."""
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    cpu, _, _ = take(paths, "cpu", 0, steps=6, start_step=1, seed=3)
    gpu, _, b = take(paths, "gpu", 0, steps=6, start_step=1, seed=3)
    assert b.kind == "gpu" and isinstance(b.decoder, data.DeviceDecoder)
    for x, y in zip(cpu, gpu):
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
        assert torch.equal(x, y)


def test_boxes_and_flips_are_the_cpu_loaders(tmp_path, files):
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    folder = data.EncodedFolder(paths, seed=5)
    for i, position in itertools.product(range(len(paths)), (0, 7, 123)):
        s = folder[(i, position)]
        im = data.load_rgb(paths[i])
        assert (s.image.width, s.image.height) == im.size
        assert (s.box, s.flip) == data.crop_and_flip(5, position, im.width, im.height)
        assert s.image.jpeg == paths[i].name.endswith(("baseline.jpg", "progressive.jpg", "444.jpg", "gray.jpg", "last.jpg"))


@pytest.mark.parametrize("loader,workers", [("cpu", 0), ("cpu", 1), ("gpu", 0), ("gpu", 1)])
def test_unreadable_files_are_replaced_and_reported_once(tmp_path, files, loader, workers):
    """A truncated JPEG, a broken Huffman table (its header passes: the decoder finds out), an empty file and text
    named .gif: each sample that drew one takes the next readable image; the batches equal the CPU loader's
    without workers, and each file is reported once."""
    bad = files.write_mixed_folder(tmp_path / "imgs")
    paths = data.find_images(tmp_path / "imgs")
    steps = 2 * len(paths) // 4 + 1  # two epochs: every file drawn twice
    expect, expect_skipped, _ = take(paths, "cpu", 0, steps=steps)
    got, skipped, b = take(paths, loader, workers, steps=steps)
    assert all(torch.equal(x, y) for x, y in zip(expect, got))
    assert sorted(p.split("/")[-1] for p in skipped) == bad == sorted(p.split("/")[-1] for p in expect_skipped)
    assert len(b.skips) == len(bad) and b.wait_s > 0


@pytest.mark.parametrize("loader,workers", [("cpu", 0), ("cpu", 1), ("gpu", 0), ("gpu", 1)])
def test_no_readable_image_is_one_error(tmp_path, files, loader, workers):
    (tmp_path / "a.jpg").write_bytes(files.jpeg_bytes(files.photo(0))[:-500])
    (tmp_path / "b.png").write_text("text")
    with pytest.raises(UnreadableImage) as e:
        take(data.find_images(tmp_path), loader, workers, steps=1)
    assert str(e.value).startswith("none of the 2 images can be read (cannot read image ")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_nvjpeg_refusal_falls_back_to_pillow(tmp_path, files):
    """JPEGs the device decoder refuses (one call for the batch fails, then one by one) are decoded by Pillow in
    the training process: the batches do not change."""
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    expect, _, _ = take(paths, "cpu", 0)
    calls = []

    def picky(datas):
        calls.append(len(datas))
        if any(len(d) % 3 == 0 for d in datas):
            raise RuntimeError("nvjpeg: unsupported stream")
        return data.pillow_decoder(datas)

    b = Batches(paths, 24, 4, workers=0, loader="gpu")
    b.decoder.decode_jpegs = picky
    got = [next(b) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(expect, got))
    assert any(n > 1 for n in calls) and any(n == 1 for n in calls)  # the batch call failed, then one by one


def test_loader_choice(tmp_path, files):
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    assert Batches(paths, 8, 2, device="cpu").kind == "cpu"
    assert data.resolve_loader("auto", "cuda") == "gpu" and data.resolve_loader("cpu", "cuda") == "cpu"
    with pytest.raises(ValueError, match="loader must be one of"):
        Batches(paths, 8, 2, loader="nvjpeg")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_loader_against_cpu_loader(tmp_path, files):
    """nvJPEG + the kernel on CUDA: the same images, boxes and flips as the CPU loader; pixels within the two JPEG
    decoders' difference (nvJPEG and libjpeg-turbo: torchvision's own test allows a mean of 2 levels), and exactly
    the CPU loader's where the workers decoded (CMYK, PNG)."""
    (tmp_path / "imgs").mkdir()
    for k in range(16):
        im = files.synthetic_photo(k, (500, 375) if k % 3 else (333, 500))  # 333x500: the vertical pass first
        (tmp_path / "imgs" / f"z_{k:02d}.jpg").write_bytes(files.jpeg_bytes(im, progressive=k == 5))
    files.synthetic_photo(16).convert("CMYK").save(tmp_path / "imgs" / "cmyk.jpg")
    files.synthetic_photo(17, (300, 200)).save(tmp_path / "imgs" / "png.png")
    paths = data.find_images(tmp_path / "imgs")
    cpu, _, _ = take(paths, "cpu", 0, steps=4, batch=8, size=224)
    gpu, _, b = take(paths, "gpu", 2, steps=4, batch=8, size=224, device="cuda")
    level = 1 / (255 * min(data.IMAGENET_STD))
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    folder = data.EncodedFolder(paths, 0)
    sampler = iter(data.StreamSampler(len(paths), 0))
    for x, y in zip(cpu, gpu):
        y = y.cpu()
        levels = ((x - y).abs() * std * 255)  # [N, 3, S, S] in 8-bit levels
        assert levels.mean() < 2
        for n in range(x.shape[0]):
            i, position = next(sampler)
            if not folder[(i, position)].image.jpeg:  # decoded by Pillow in a worker: the CPU loader's pixels
                assert (x[n] - y[n]).abs().max() <= level * 1.0001


@pytest.mark.gpu
def test_gpu_loader_images_per_second(tmp_path, files, capsys):
    """The GPU loader's rate on 256 ImageNet-sized JPEGs (500x375 and 375x500, quality 90) at 224 px, batch 128:
    printed (no timed assert); `mae-fast bench --data DIR` puts it beside the training step."""
    from mae_fast.tools import data_bench

    for k in range(256):
        im = files.synthetic_photo(k, (500, 375) if k % 4 else (375, 500))
        (tmp_path / f"{k:03d}.jpg").write_bytes(files.jpeg_bytes(im))
    paths = data.find_images(tmp_path)
    row = data_bench.loader_rate(paths, 224, 128, "gpu", data.default_workers(), torch.device("cuda"), batches=8,
                                 warmup=2)
    with capsys.disabled():
        print(f"\nGPU loader: {row['images_per_s']:.0f} images/s ({row['workers']} workers, {torch.cuda.get_device_name()})")
    assert row["images_per_s"] > 0 and row["skipped_files"] == 0


def test_gpu_loader_imports_torchvision_only_when_used(tmp_path, files):
    """The GPU loader on CUDA needs torchvision; where it does not import, the error says so and names the way
    out (the CPU loader). Nothing else in mae_fast.data imports it."""
    import importlib.util
    import subprocess
    import sys

    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match=r"torchvision.*--loader cpu"):
            Batches(paths, 8, 2, device="cuda", loader="gpu")
    else:
        assert callable(data.nvjpeg_decoder(torch.device("cuda")))
    code = "import sys, mae_fast.data, mae_fast.tools.pretrain; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
