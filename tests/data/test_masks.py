"""Masks keyed by stream position, and the stream split over processes: each process's part of a global batch,
put side by side with the others', is the one-process batch (images and mask noise), on both loaders and
with 0 or 1 workers; a sample's mask noise depends on its position alone."""
import pytest
import torch

from mae_fast import data
from mae_fast.data import Batches, StreamSampler, mask_noise


def test_mask_noise_is_keyed_by_position():
    a = mask_noise(3, 17, 16)
    assert a.shape == (16,) and a.dtype == torch.float32 and float(a.min()) >= 0 and float(a.max()) < 1
    assert torch.equal(a, mask_noise(3, 17, 16))
    assert not torch.equal(a, mask_noise(3, 18, 16)) and not torch.equal(a, mask_noise(4, 17, 16))
    # not the draws of the sample's crop generator, nor those of a nearby position's
    for p in (17, 18, 17 + 2**20):
        assert not torch.equal(a, torch.rand(16, generator=data.sample_generator(3, p)))


@pytest.mark.parametrize("world,batch,start", [(2, 4, 0), (3, 6, 5), (4, 4, 2)])
def test_stream_parts_side_by_side_are_the_stream(world, batch, start):
    """Each process's part of every global batch; together, in rank order, the one-process stream (from a
    resumed position too), over several epochs of 7 images."""
    one = iter(StreamSampler(7, seed=1, start=start))
    parts = [iter(StreamSampler(7, seed=1, start=start, batch_size=batch, rank=r, world_size=world))
             for r in range(world)]
    for _ in range(5):  # 5 global batches
        together = [next(it) for it in parts for _ in range(batch // world)]
        assert together == [next(one) for _ in range(batch)]


def test_stream_sampler_errors():
    with pytest.raises(ValueError, match="batch_size 5 does not split into 2 equal parts"):
        StreamSampler(7, batch_size=5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        StreamSampler(7, batch_size=4, rank=2, world_size=2)


@pytest.mark.parametrize("loader,workers", [("cpu", 0), ("cpu", 1), ("gpu", 0)])
def test_batches_of_two_processes_are_one_processs(tmp_path, files, loader, workers):
    """Two processes' batches (images and noise), concatenated, equal one process's, from a resumed step."""
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")

    def take(**kw):
        b = Batches(paths, 16, 4, seed=2, start_step=1, workers=workers, loader=loader, mask_noise=4, **kw)
        try:
            return [next(b) for _ in range(3)]
        finally:
            b.close()

    one = take()
    parts = [take(rank=r, world_size=2) for r in (0, 1)]
    for k, (imgs, noise) in enumerate(one):
        assert imgs.shape == (4, 3, 16, 16) and noise.shape == (4, 4) and noise.dtype == torch.float32
        assert torch.equal(imgs, torch.cat([p[k][0] for p in parts]))
        assert torch.equal(noise, torch.cat([p[k][1] for p in parts]))
        assert torch.equal(noise, torch.stack([mask_noise(2, (1 + k) * 4 + j, 4) for j in range(4)]))


def test_batches_errors(tmp_path, files):
    files.write_mixed_folder(tmp_path / "imgs", bad=False)
    paths = data.find_images(tmp_path / "imgs")
    with pytest.raises(ValueError, match="batch_size 6 does not split into 4 equal parts"):
        Batches(paths, 16, 6, world_size=4, rank=1)
    plain = Batches(paths, 16, 2)
    try:
        assert isinstance(next(plain), torch.Tensor)  # without mask_noise: the images alone, as before
    finally:
        plain.close()
