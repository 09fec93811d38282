"""`mae-fast pretrain`: the official recipe's pieces, a run on the photographs scikit-image ships, exact resume,
reconstruction pictures that show what they say, and clear errors. Tiny: 32 px images, batches of 4, a few steps."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import models
from mae_fast.tools import cli, pretrain, reconstructions

TINY = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]


def _official_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The official MAE's adjust_learning_rate (util/lr_sched.py), written from its formula."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_lr_schedule_is_the_official_one_per_step():
    cfg = pretrain.PretrainConfig(steps=100, warmup_steps=5, lr=1e-3, min_lr=1e-5)
    per_epoch = 10  # 10 epochs of 10 steps, 0.5 warm-up epochs
    for step in range(100):
        assert pretrain.lr_at(step, cfg) == pytest.approx(_official_lr(step / per_epoch, 1e-3, 1e-5, 0.5, 10), rel=1e-12)
    assert pretrain.lr_at(0, cfg) == 0.0 and pretrain.lr_at(5, cfg) == pytest.approx(1e-3)
    # the scheduler TrainStep steps gives step i the lr lr_at(i)
    cfg = pretrain.PretrainConfig(model="mae_vit_tiny_patch8", img_size=32, device="cpu").resolve(10)
    cfg.steps, cfg.warmup_steps = 8, 2
    _, opt, sched = pretrain.build(cfg)
    for step in range(8):
        assert all(g["lr"] == pytest.approx(pretrain.lr_at(step, cfg), abs=1e-15) for g in opt.param_groups)
        opt.step()
        sched.step()


def test_lr_scales_with_batch_and_warmup_default():
    cfg = pretrain.PretrainConfig(model="mae_vit_tiny_patch8", batch_size=64, steps=200, device="cpu").resolve(10)
    assert cfg.lr == pytest.approx(1.5e-4 * 64 / 256) and cfg.warmup_steps == 10 and cfg.img_size == 64
    cfg = pretrain.PretrainConfig(batch_size=4, epochs=3, device="cpu").resolve(10)
    assert cfg.steps == 8  # ceil(3 epochs x 10 images / 4)
    cfg = pretrain.PretrainConfig(batch_size=4, accum_iter=3, epochs=3, device="cpu").resolve(10)
    assert cfg.lr == pytest.approx(1.5e-4 * 12 / 256) and cfg.steps == 3  # a step: 4 x 3 images


def test_weight_decay_groups():
    model = models.mae_vit_tiny_patch8()
    no_decay, decay = pretrain.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.bias" in nd and "blocks.0.norm1.weight" in nd and "norm.weight" in nd
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "mask_token"} <= d
    assert "pos_embed" not in nd | d  # fixed sin-cos table, no gradient
    assert nd | d == {n for n, p in model.named_parameters() if p.requires_grad} and not nd & d


@pytest.mark.parametrize("size", [(512, 384), (384, 512), (1000, 8), (17, 23)])
def test_random_resized_crop_box(size):
    W, H = size
    for seed in range(50):
        left, top, right, bottom = pretrain.random_resized_crop_box(W, H, torch.Generator().manual_seed(seed))
        assert 0 <= left < right <= W and 0 <= top < bottom <= H
        w, h = right - left, bottom - top
        if (W, H) != (1000, 8):  # a normal image: the drawn area and aspect
            assert 0.2 * W * H * 0.8 <= w * h <= W * H
            assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    if (W, H) == (1000, 8):  # no crop of an allowed aspect fits: the centred one of aspect 4/3
        assert pretrain.random_resized_crop_box(W, H, torch.Generator()) == (494, 0, 505, 8)


def test_stream_sampler_epochs_and_resume():
    it = iter(pretrain.StreamSampler(7, seed=3))
    first = [next(it) for _ in range(21)]
    assert [pos for _, pos in first] == list(range(21))
    epochs = [sorted(i for i, _ in first[k:k + 7]) for k in (0, 7, 14)]
    assert all(e == list(range(7)) for e in epochs)  # every epoch a permutation
    assert [i for i, _ in first[:7]] != [i for i, _ in first[7:14]]  # reshuffled
    it = iter(pretrain.StreamSampler(7, seed=3, start=10))
    assert [next(it) for _ in range(11)] == first[10:]  # a resumed stream continues the same sequence


def test_reconstruction_shows_the_truth():
    """A model that predicted every patch exactly (normalised, as norm_pix_loss trains it) is drawn as the image
    itself; the masked picture has the removed patches at 0 (the mean colour) and the visible ones intact."""
    torch.manual_seed(0)
    model = models.mae_vit_tiny_patch8(img_size=32, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    real_forward = model.forward

    def exact(imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = real_forward(imgs, mask_ratio, noise)
        t = model.patchify(imgs)
        return loss, (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5, mask

    model.forward = exact
    masked, recon, pasted = reconstructions.reconstruct(model, imgs, 0.75)
    torch.testing.assert_close(recon, imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pasted, imgs, atol=1e-4, rtol=1e-4)
    removed = (masked == 0).all(dim=1)  # [N, H, W]
    assert removed.float().mean().item() == pytest.approx(0.75)  # 12 of 16 patches
    assert torch.equal(masked[~removed.unsqueeze(1).expand_as(masked)], imgs[~removed.unsqueeze(1).expand_as(imgs)])
    assert model.training  # put back in training mode


def test_pretrain_on_the_sample_photographs(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--sample", *TINY, "--steps", "4", "--log-every", "2", "--recon-images", "3",
                     "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "on 10 images from the sample photographs" in text and "lr 2.34e-06" in text  # 1.5e-4 x 4 / 256
    assert f"checkpoint {out / 'checkpoint.pth'}" in text and f"reconstructions {out / 'recon_000004.png'}" in text
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and state["config"]["model"] == "mae_vit_tiny_patch8"
    assert set(state["model"]) == set(models.mae_vit_tiny_patch8(img_size=32).state_dict())  # official keys
    assert state["scheduler"]["last_epoch"] == 4 and len(state["optimizer"]["state"]) > 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in lines)
    png = Image.open(out / "recon_000004.png")
    assert png.size == (4 * (128 + 4) + 4, 14 + 3 * (128 + 4) + 4)  # 4 columns, 3 rows of 32 px drawn 4x
    assert np.asarray(png).std() > 10  # not blank


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """4 steps in one go equal 2 steps, a checkpoint, and 2 resumed steps: weights, optimizer state and the
    next masks (RNG state) agree bit for bit. A reconstruction picture in between changes nothing."""
    saved = []
    real_save = pretrain.save_checkpoint

    def keep(path, model, opt, sched, step, cfg):
        real_save(path, model, opt, sched, step, cfg)
        if step == 2:
            shutil.copy(path, tmp_path / "at2.pth")
        saved.append(step)

    monkeypatch.setattr(pretrain, "save_checkpoint", keep)
    args = ["pretrain", "--sample", *TINY, "--steps", "4"]
    assert cli.main([*args, "--save-every", "2", "--recon-every", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert saved == [2, 4]
    assert cli.main([*args, "--resume", str(tmp_path / "at2.pth"), "--output-dir", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[k], b["optimizer"]["state"][i][k]) for k in s)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # --resume without a path continues from the output folder's checkpoint
    assert cli.main([*args[:-1], "6", "--resume", "--output-dir", str(tmp_path / "b")]) == 0
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["step"] == 6


def test_pretrain_on_a_folder(tmp_path):
    """A folder with subfolders (an ImageNet-like layout), gray, RGBA and small images, fewer than a batch."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)).save(tmp_path / "imgs" / "b" / "y.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8)).save(tmp_path / "imgs" / "b" / "z.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert [p.name for p in pretrain.find_images(tmp_path / "imgs")] == ["x.png", "y.jpg", "z.png"]
    assert cli.main(["pretrain", str(tmp_path / "imgs"), *TINY, "--steps", "2", "--output-dir",
                     str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "recon_000002.png").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "2", "--epochs", "1"], "not allowed with"),
    (["--mask-ratio", "1"], "--mask-ratio must be in [0, 1)"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--dtype", "fp16"], "invalid choice"),
])
def test_bad_flags(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--sample", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_needs_images(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain"])
    assert e.value.code == 2 and "DIR --sample" in capsys.readouterr().err.replace("[", "").replace("]", "")


@pytest.mark.parametrize("setup,argv,msg", [
    (None, ["/nonexistent/folder"], "is not a folder"),
    ("empty", [], "no image files"),
    (None, ["--sample", "--mask-ratio", "0.99"], "--mask-ratio 0.99 keeps no patch"),
    (None, ["--sample", "--model", "vit_giant"], "--model 'vit_giant' is unknown"),
    (None, ["--sample", "--img-size", "30"], "--img-size/--patch-size: img_size (30, 30) is not divisible"),
    (None, ["--sample", "--loader", "gpu"], "--loader gpu decodes on a CUDA device"),
    ("unreadable", [], "none of the 2 images can be read (cannot read image "),
    (None, ["--sample", "--resume", "/nonexistent.pth"], "--resume: no checkpoint at /nonexistent.pth"),
    ("not_a_checkpoint", ["--sample", "--resume"], "is not a `mae-fast pretrain` checkpoint"),
    ("not_a_checkpoint", ["--sample"], "checkpoint.pth exists: --resume continues that run"),
])
def test_clear_errors(tmp_path, setup, argv, msg):
    if setup == "empty":
        argv = [str(tmp_path)]
    if setup == "unreadable":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "a.jpg").write_text("not an image")
        (tmp_path / "imgs" / "b.png").write_bytes(b"")
        argv = [str(tmp_path / "imgs")]
    if setup == "not_a_checkpoint":
        torch.save({"weights": 1}, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", *TINY, *argv, "--steps", "1", "--output-dir", str(tmp_path)])
    assert isinstance(e.value.code, str) and e.value.code.startswith("mae-fast pretrain: ") and msg in e.value.code


def test_unreadable_files_are_skipped_alike_with_and_without_workers(tmp_path, capsys):
    """A corrupt JPEG, a truncated one and an empty PNG among good images: with 0 and with 1 worker the run
    finishes, reports each file once, counts them in the log, and trains on the same data (the same weights)."""
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(5):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(imgs / f"{k}.jpg")
    (imgs / "1.jpg").write_bytes((imgs / "1.jpg").read_bytes()[:-200])  # truncated
    (imgs / "3.jpg").write_bytes(b"\xff\xd8 garbage")
    (imgs / "4b.png").write_bytes(b"")
    weights = []
    for workers in ("0", "1"):
        out = tmp_path / f"run{workers}"
        argv = ["pretrain", str(imgs), *TINY[:4], "--workers", workers, *TINY[6:], "--steps", "4", "--log-every", "2",
                "--output-dir", str(out)]
        assert cli.main(argv) == 0
        text = capsys.readouterr().out
        assert text.count("pretrain: skipped an unreadable file") == 3 and "(3 unreadable files skipped)" in text
        assert "cpu loader with " + ("0 workers" if workers == "0" else "1 worker") in text
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert [x["skipped_files"] for x in lines] == [3, 3] and all(x["data_wait_s"] >= 0 for x in lines)
        weights.append(torch.load(out / "checkpoint.pth", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
