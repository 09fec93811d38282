"""Video models in the benchmark tools: flags, clips as inputs, FLOPs per clip, JSON and headers."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae_fast import reference
from mae_fast.tools import bench, cli, flops, sweep, variants

# tiny video: 16x16 frames, p = 8 (h = w = 2), T = 4 frames, tubelets of u = 2 -> L = 2 * 2 * 2 = 8 tokens
VIDEO = dict(img_size=16, num_frames=4, t_patch_size=2)
RUN = ["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--batch-size", "2", "--warmup", "1", "--no-progress"]


# ----------------------------------------------------------------------------- FLOPs
def test_video_dims_hand_checked():
    d = flops.dims_of_config("mae_vit_tiny_patch8", **VIDEO)
    assert (d.num_frames, d.t_patch_size, d.tube_masking, d.video) == (4, 2, False, True)
    assert d.num_patches == 2 * 2 * 2 and d.patch_dim == 2 * 8 * 8 * 3  # (T/u)*h*w, u*p*p*C
    assert d.input_shape(5) == (5, 3, 4, 16, 16) and d.noise_tokens == 8
    tube = flops.dims_of_config("mae_vit_tiny_patch8", **VIDEO, tube_masking=True)
    assert tube.noise_tokens == 4  # one spatial noise per clip: L / (T/u)
    assert d.num_kept(0.6) == 3 and tube.num_kept(0.6) == 2  # int(8 * 0.4); 2 * int(4 * 0.4)
    # the sizes read from a built model (reference and fast) are the config's
    assert flops.dims_of(reference.create_model("mae_vit_tiny_patch8", **VIDEO, tube_masking=True)) == tube
    from mae_fast import models

    assert flops.dims_of(models.create_model("mae_vit_tiny_patch8", **VIDEO)) == d


def _by_hand(K: int) -> int:
    """Forward FLOPs of the tiny video config above (D 192, 6 blocks, MLP 768; decoder 128, 2 blocks, MLP 512),
    the reference way: every patch embedded, every row predicted."""
    te, td, P = 1 + K, 1 + 8, 2 * 8 * 8 * 3
    encoder = 6 * (2 * te * 192 * 576 + 2 * te * te * 192 * 2 + 2 * te * 192 * 192 + 2 * te * 192 * 768 * 2)
    decoder = 2 * (2 * td * 128 * 384 + 2 * td * td * 128 * 2 + 2 * td * 128 * 128 + 2 * td * 128 * 512 * 2)
    return 2 * 8 * P * 192 + encoder + 2 * te * 192 * 128 + decoder + 2 * td * 128 * P  # Conv3d = GEMM of width P


def test_video_flops_hand_checked():
    d = flops.dims_of_config("mae_vit_tiny_patch8", **VIDEO)
    tube = flops.dims_of_config("mae_vit_tiny_patch8", **VIDEO, tube_masking=True)
    assert flops.forward_flops(d, 0.6) == _by_hand(3) == 30_729_216
    assert flops.forward_flops(tube, 0.6) == _by_hand(2) == 25_339_392
    parts = flops.flops_breakdown(d, 0.6, embed_visible_only=True, pred_masked_only=True)
    assert parts["patch_embed"] == 2 * 3 * 384 * 192 and parts["decoder_pred"] == 2 * 5 * 128 * 384


def _counted(model, clips, ratio, noise=None):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        variants.AllPatchLoss(model)(clips, mask_ratio=ratio, noise=noise)
    return fc.get_total_flops() / clips.shape[0]


@pytest.mark.parametrize("tube", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.75])
def test_video_flops_match_the_counter(ratio, tube):
    """The analytic count equals torch's FLOP counter on the real reference forward (Conv3d included)."""
    torch.manual_seed(0)
    model = reference.create_model("mae_vit_tiny_patch8", **VIDEO, tube_masking=tube)
    d = flops.dims_of(model)
    clips = torch.randn(*d.input_shape(2))
    noise = torch.rand(2, d.noise_tokens) if ratio > 0 else None  # the shape the model takes
    assert flops.forward_flops(d, ratio) == _counted(model, clips, ratio, noise)


def test_one_frame_is_the_image_model():
    for name in ("mae_vit_tiny_patch8", "mae_vit_base_patch16"):
        img = flops.dims_of_config(name)
        assert flops.dims_of_config(name, num_frames=1, t_patch_size=1) == img
        assert (img.num_frames, img.t_patch_size, img.tube_masking, img.video) == (1, 1, False, False)
        for r in (0.0, 0.75):
            assert flops.forward_flops(flops.dims_of_config(name, num_frames=1), r) == flops.forward_flops(img, r)
    assert flops.video_kwargs(1, 1, False) == {} and flops.video_kwargs(None, None) == {}
    assert flops.dims_of_config("mae_vit_tiny_patch8").input_shape(2) == (2, 3, 64, 64)


# ----------------------------------------------------------------------------- bench
def _check(r, batch):
    assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and 0 < r["mfu"] < 5 and r["final_loss"] > 0
    assert 0 < r["step_ms_p20"] <= r["step_ms_median"] <= r["step_ms_p80"]
    assert r["images_per_s"] == pytest.approx(batch / (r["step_ms_median"] / 1e3))
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12)


def test_bench_video_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", *RUN, "--img-size", "32", "--num-frames", "4", "--t-patch-size", "2", "--steps", "2",
                     "--variants", "reference,mae_fast", "--peak-tflops", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    c = doc["config"]
    assert (c["num_frames"], c["t_patch_size"], c["tube_masking"], c["video"]) == (4, 2, False, True)
    assert c["input_shape"] == [2, 3, 4, 32, 32] and c["num_patches"] == 2 * 4 * 4
    assert "video" in doc["notes"]
    ref, fast = doc["results"]
    for r in (ref, fast):
        _check(r, 2)
    dims = flops.dims_of_config("mae_vit_tiny_patch8", 32, num_frames=4, t_patch_size=2)
    assert ref["flops_per_image"] == flops.train_flops(dims, 0.75)
    assert fast["flops_per_image"] == flops.train_flops(dims, 0.75, **fast["flops_counting"]) < ref["flops_per_image"]
    head = capsys.readouterr().out.splitlines()[0]
    assert "4 frames x 32px, tubelet 2x8x8" in head and "batch 2 clips" in head


def test_bench_video_tube_default_tubelet(tmp_path, capsys):
    """--num-frames alone: tubelets of 2 frames; --tube: tube masking, the loss still defined at ratio 0."""
    out = tmp_path / "b.json"
    assert cli.main(["bench", *RUN, "--img-size", "16", "--num-frames", "4", "--tube", "--steps", "1",
                     "--mask-ratio", "0", "--variants", "reference", "--peak-tflops", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (doc["config"]["t_patch_size"], doc["config"]["tube_masking"]) == (2, True)
    (r,) = doc["results"]
    _check(r, 2)
    assert "tube masking" in capsys.readouterr().out.splitlines()[0]


def test_video_default_batch_keeps_tokens_per_batch():
    assert bench.default_config("cpu").batch_size == 32
    assert bench.default_config("cpu", num_frames=4, t_patch_size=2).batch_size == 16  # T/u = 2 slots
    assert bench.default_config("cpu", num_frames=8, t_patch_size=2, batch_size=3).batch_size == 3
    assert sweep.default_config("cpu", num_frames=16, t_patch_size=2).batch_size == 1


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--num-frames", "5", "--t-patch-size", "2"], "--num-frames 5 is not a multiple of --t-patch-size 2"),
    (["bench", "--num-frames", "3"], "--num-frames 3 is not a multiple of --t-patch-size 2 (the default"),
    (["bench", "--tube"], "--tube (tube masking) needs a video model"),
    (["bench", "--num-frames", "1", "--tube"], "--tube (tube masking) needs a video model"),
    (["bench", "--t-patch-size", "2"], "--t-patch-size 2 needs a video model"),
    (["sweep", "--num-frames", "6", "--t-patch-size", "4"], "--num-frames 6 is not a multiple of --t-patch-size 4"),
    (["sweep", "--num-frames", "4", "--theory", "sample"], "--theory: the linear-MAE theory is for image models"),
    (["profile", "--tube"], "--tube (tube masking) needs a video model"),
])
def test_bad_video_settings(argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--device", "cpu"])
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"mae-fast {argv[0]}: ") and msg in e.value.code


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--num-frames", "0"], "--num-frames must be >= 1"),
    (["sweep", "--t-patch-size", "x"], "--t-patch-size must be an integer"),
])
def test_bad_video_flag_values(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_video_settings_checked_in_the_api():
    cfg = bench.default_config("cpu", batch_size=1, steps=1, warmup=1, num_frames=4, t_patch_size=3)
    with pytest.raises(ValueError, match="--num-frames 4 is not a multiple of --t-patch-size 3"):
        bench.run(cfg, progress=False)


# ----------------------------------------------------------------------------- sweep and profile
def test_sweep_video_cpu(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert cli.main(["sweep", *RUN, "--img-size", "16", "--num-frames", "4", "--t-patch-size", "2", "--tube",
                     "--steps", "1", "--patch-sizes", "8", "--mask-ratios", "0.5", "--variants", "reference",
                     "--peak-tflops", "0.01", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    c = doc["config"]
    assert (c["num_frames"], c["t_patch_size"], c["tube_masking"], c["video"]) == (4, 2, True, True)
    rows = {(r["patch_size"], r["mask_ratio"]): r for r in doc["results"]}
    assert set(rows) == {(8, 0.0), (8, 0.5)}
    for (p, m), r in rows.items():
        assert "error" not in r, r
        dims = flops.dims_of_config("mae_vit_tiny_patch8", 16, p, num_frames=4, t_patch_size=2, tube_masking=True)
        assert r["flops_per_image"] == flops.train_flops(dims, m) and r["final_loss"] > 0
    text = capsys.readouterr().out
    assert "4 frames x 16px, tubelet 2 frames" in text and "tube masking" in text and "clips_per_s" in text


def test_profile_video_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli.main(["profile", *RUN[:-1], "--img-size", "16", "--num-frames", "4", "--variants", "reference",
                     "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    c = doc["config"]
    assert (c["num_frames"], c["t_patch_size"], c["video"], c["input_shape"]) == (4, 2, True, [2, 3, 4, 16, 16])
    (r,) = doc["results"]
    assert r["categories"]["patch_embed"]["ms"] > 0 and r["categories"]["loss"]["ms"] > 0
    assert "4 frames x 16px, tubelet 2x8x8" in capsys.readouterr().out.splitlines()[0]


def test_every_variant_is_built_as_video(monkeypatch):
    """The video arguments reach every variant's factory, compiled or not (torch.compile stubbed: the build is
    under test here, not the compiler)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    cfg = bench.default_config("cpu", batch_size=1, steps=1, warmup=1, num_frames=4, t_patch_size=2,
                                   tube_masking=True, img_size=16)
    want = cfg.dims()
    assert want.video and want.tube_masking
    for name in variants.ALL_VARIANTS:
        assert flops.dims_of(variants.VARIANTS[name](cfg, torch.device("cpu"))) == want, name
