"""`mae-fast bench` (what `make bench` runs) and the command line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mae_fast.tools import bench, cli, report, variants


def test_bench_tiny_cpu_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--device", "cpu", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                   "--img-size", "32", "--json", str(out), "--no-progress", "--variants", "reference"])
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in ("device", "versions", "commit", "command", "config", "results"):
        assert key in doc
    assert doc["command"].startswith("mae-fast bench")
    assert doc["config"]["model"] == "mae_vit_tiny_patch8" and doc["config"]["dtype"] == "fp32"
    r = next(x for x in doc["results"] if x["variant"] == "reference")
    assert r["steps"] == 3
    assert r["step_ms_p20"] <= r["step_ms_median"] <= r["step_ms_p80"]
    assert r["images_per_s"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
    assert r["speedup_vs_reference"] == 1.0 and r["final_loss"] > 0
    table = capsys.readouterr().out
    assert "images_per_s" in table and "reference" in table


def test_bench_trains(tmp_path):
    """The timed step really updates the weights (forward, backward, optimizer step)."""
    cfg = bench.default_config("cpu", batch_size=2, steps=1, warmup=1, img_size=32)
    cfg.img_size = 32
    cfg.variants = ["reference"]
    torch.manual_seed(cfg.seed)
    before = variants.build_reference(cfg, torch.device("cpu")).state_dict()["blocks.0.attn.qkv.weight"].clone()
    calls = []
    orig = variants.VARIANTS["reference"]

    def spy(c, d):
        m = orig(c, d)
        calls.append(m)
        return m

    variants.VARIANTS["reference"] = spy
    try:
        bench.run(cfg, progress=False)
    finally:
        variants.VARIANTS["reference"] = orig
    after = calls[0].state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(before, after)


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
    (["bench", "--steps", "x"], "--steps must be an integer"),
    (["bench", "--dtype", "int8"], "invalid choice"),
    (["bench", "--variants", "reference,fast"], "unknown variant"),
    (["bench", "--peak-tflops", "-1"], "--peak-tflops must be > 0"),
    (["bench", "--compile", "--no-compile"], "not allowed with"),
    (["sweep", "--mask-ratios", "0.5,1.2"], "every value must be in [0, 1)"),
    (["sweep", "--patch-sizes", "8,x"], "--patch-sizes must be comma-separated integers"),
    (["sweep", "--patch-sizes", "0"], "every value must be >= 1"),
    (["profile", "--top", "0"], "--top must be >= 1"),
])
def test_bad_flags(argv, msg, capsys):
    """A bad flag value: argparse's exit status 2 and a message that names the flag and what it takes."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_bench_unknown_model():
    with pytest.raises(SystemExit, match="unknown"):
        cli.main(["bench", "--model", "mae_vit_giant", "--device", "cpu"])


def test_python_dash_m_is_the_command():
    res = subprocess.run([sys.executable, "-m", "mae_fast", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "bench" in res.stdout
    for cmd in ("sweep", "profile"):
        assert cmd in res.stdout
    if importlib.util.find_spec("mae_fast.theory.cli") is not None:
        assert "theory" in res.stdout


# ----------------------------------------------------------------------------- bench: schema and variants
RESULT_KEYS = ("variant", "images_per_s", "step_ms_median", "step_ms_p20", "step_ms_p80", "peak_mem_bytes",
               "flops_per_image", "mfu", "speedup_vs_reference")
TINY = ["--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--img-size", "16", "--no-progress"]


class _FakeFast:
    """Stands in for mae_fast.models: builds the reference (the plumbing is under test, not the model)."""

    @staticmethod
    def create_model(name, **kwargs):
        from mae_fast import reference

        model = reference.create_model(name, **kwargs)
        model.forward_train = lambda imgs, mask_ratio=0.75: model(imgs, mask_ratio)[0]  # the loss-only path
        return model


def _check_result(r, batch):
    for k in RESULT_KEYS:
        assert k in r, k
    assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and 0 < r["mfu"] < 5
    assert 0 < r["step_ms_p20"] <= r["step_ms_median"] <= r["step_ms_p80"]
    assert r["images_per_s"] == pytest.approx(batch / (r["step_ms_median"] / 1e3))
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12)


def test_bench_schema_and_fast_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(variants, "fast_models_module", lambda: _FakeFast)
    out = tmp_path / "b.json"
    assert cli.main(["bench", *TINY, "--json", str(out), "--peak-tflops", "0.05"]) == 0
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["results"]] == ["reference", "mae_fast"]  # CPU default: eager only
    assert doc["peak_source"].startswith("given") and doc["peak_flops_per_s"] == 0.05e12
    ref, fast = doc["results"]
    for r in doc["results"]:
        _check_result(r, 2)
        assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 0.05e12)
    assert ref["speedup_vs_reference"] == 1.0
    assert fast["speedup_vs_reference"] == pytest.approx(fast["images_per_s"] / ref["images_per_s"])
    # the fast model is counted with visible-only embedding and a head on removed tokens: fewer FLOPs
    assert fast["flops_counting"] == {"embed_visible_only": True, "pred_masked_only": True}
    assert fast["flops_per_image"] < ref["flops_per_image"]
    assert "skipped_variants" not in doc


def test_bench_compile_variants_are_compiled(tmp_path, monkeypatch):
    """The +compile variants go through torch.compile (default mode). Compiling on this CPU takes minutes,
    so torch.compile is replaced by a recorder here; a real compile runs in test_bench_real_compile."""
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append((type(model).__name__, kwargs))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(variants, "fast_models_module", lambda: _FakeFast)
    out = tmp_path / "b.json"
    assert cli.main(["bench", *TINY, "--compile", "--json", str(out), "--peak-tflops", "1"]) == 0
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["results"]] == ["reference", "reference+compile", "mae_fast", "mae_fast+compile"]
    assert compiled == [("MaskedAutoencoderViT", {}), ("TrainLoss", {})]  # default mode, no options


@pytest.mark.skipif(not os.environ.get("MAE_FAST_SLOW"), reason="a real CPU torch.compile takes ~3 min here; set MAE_FAST_SLOW=1")
def test_bench_real_compile(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--img-size", "16",
                     "--variants", "reference,reference+compile", "--no-progress", "--json", str(out)]) == 0
    for r in json.loads(out.read_text())["results"]:
        _check_result(r, 2)


def test_bench_fast_variant_missing_is_a_clear_error(monkeypatch, capsys):
    def missing():
        raise variants.VariantUnavailable("the mae_fast variants need mae_fast.models (create_model), which does not import here")

    monkeypatch.setattr(variants, "fast_models_module", missing)
    with pytest.raises(SystemExit, match="mae_fast.models"):
        cli.main(["bench", *TINY, "--variants", "mae_fast"])
    # not asked for: skipped, and the document says so (never the reference timed under another name)
    doc = bench.run(bench.default_config("cpu", batch_size=1, steps=1, warmup=1, img_size=16, peak_tflops=1.0),
                        progress=False)
    assert [r["variant"] for r in doc["results"]] == ["reference"]
    assert set(doc["skipped_variants"]) == {"mae_fast"}


def test_bench_real_fast_model(tmp_path):
    assert variants.fast_available()  # mae_fast.models imports: a broken fast model fails here, never skips
    out = tmp_path / "b.json"
    assert cli.main(["bench", *TINY, "--variants", "reference,mae_fast", "--json", str(out), "--peak-tflops", "1"]) == 0
    ref, fast = json.loads(out.read_text())["results"]
    _check_result(fast, 2)
    assert fast["variant"] == "mae_fast" and fast["final_loss"] > 0
    assert fast["flops_counting"]["embed_visible_only"] and fast["flops_per_image"] < ref["flops_per_image"]


def test_bench_ratio_zero_loss_is_defined():
    """At mask ratio 0 the reference's masked mean is 0/0; the benchmark uses the loss over all patches."""
    from mae_fast import reference

    torch.manual_seed(0)
    model = reference.create_model("mae_vit_tiny_patch8", img_size=16, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.isnan(model(imgs, mask_ratio=0.0)[0])  # the official loss
    wrapped = variants.AllPatchLoss(model)
    loss, pred, mask = wrapped(imgs, mask_ratio=0.0)
    assert mask.sum() == 0 and torch.isfinite(loss)
    expected = reference.patch_loss(imgs, pred, torch.ones_like(mask), 8, norm_pix_loss=True)
    torch.testing.assert_close(loss, expected)
    noise = torch.rand(2, 4)
    torch.testing.assert_close(wrapped(imgs, 0.5, noise)[0], model(imgs, 0.5, noise)[0])  # unchanged for ratio > 0
    cfg = bench.default_config("cpu", batch_size=1, steps=1, warmup=1, img_size=16, mask_ratio=0.0,
                                   variants=["reference"], peak_tflops=1.0)
    (r,) = bench.run(cfg, progress=False)["results"]
    assert r["final_loss"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["sweep", "--device", "cpu", "--patch-sizes", "7"], "7 does not divide the image size 64"),
    (["sweep", "--device", "cpu", "--theory", "/nonexistent/folder"], "is not a folder"),
    (["bench", "--device", "cpu", "--patch-size", "7"], "--img-size/--patch-size"),
    (["bench", "--device", "cpu", "--dtype", "fp16"], "fp16 is for CUDA"),
    (["bench", "--device", "cpu", "--variants", "reference", "--compile"], "not both"),
    (["profile", "--model", "vit_giant", "--device", "cpu"], "unknown"),
    (["bench", "--device", "cuda:0"] if not torch.cuda.is_available() else ["bench", "--device", "nodev"], ""),
])
def test_bad_settings_clear_errors(argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("mae-fast ") and msg in e.value.code


# ----------------------------------------------------------------------------- command-line habits
def test_help_needs_no_torch():
    """`mae-fast --help` builds every parser without importing torch (it answers at once)."""
    code = ("import sys; from mae_fast.tools import cli; cli.build_parser(); "
            "sys.exit(3 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_told(given, expected):
    """Spinning OpenMP threads made CPU steps many times slower on a busy machine: the command asks for
    sleeping ones before torch loads OpenMP, unless OMP_WAIT_POLICY is set."""
    code = ("import os\nfrom mae_fast.tools import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.split()[-1] == expected, res.stdout + res.stderr


@pytest.mark.parametrize("cmd,expected", [
    ("bench", ["--steps STEPS  timed steps per variant (default: 20 on a CPU, 30 on a GPU)",
               "--warmup WARMUP  untimed warm-up steps (default: 3 on a CPU, 5 on a GPU)",
               "--mask-ratio MASK_RATIO  fraction of patches removed (default: 0.75)",
               "--batch-size BATCH_SIZE  per device (default: 32 on a CPU, 256 on a GPU)"]),
    ("sweep", ["(default: 10 on a CPU, 8 on a GPU)", "(default: 0,0.5,0.6,0.75,0.85,0.9,0.95)"]),
    ("profile", ["untimed warm-up steps (default: 3)", "top ops listed per variant (default: 15)"]),
    ("pretrain", ["(default: 600 on a CPU, 100000 on a GPU)", "(default: 0.00015)", "(default: output_dir)"]),
])
def test_help_shows_defaults(cmd, expected, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for want in expected:
        assert " ".join(want.split()) in text
    assert "(default: True)" not in text and "(default: None)" not in text


def test_python_dash_m_names_itself(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mae_fast", "bench", "--mask-ratio", "2"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("usage: python -m mae_fast bench")
    out = tmp_path / "b.json"
    assert cli.main(["bench", *TINY, "--variants", "reference", "--peak-tflops", "1", "--json", str(out)],
                    prog="python -m mae_fast") == 0
    assert json.loads(out.read_text())["command"].startswith("python -m mae_fast bench --device cpu")


def test_mask_ratio_that_keeps_no_patch_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--mask-ratio", "0.99"])
    assert e.value.code == ("mae-fast bench: --mask-ratio 0.99 keeps no patch: K = int(64 x (1 - 0.99)) = 0 of 64 "
                            "patches; 0.98 or less keeps at least one")
    with pytest.raises(SystemExit, match="--mask-ratio 0.9 keeps no patch"):
        cli.main(["profile", "--device", "cpu", "--img-size", "16", "--mask-ratio", "0.9"])


def test_threads_flag_and_progress_bar(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "b.json"
    try:
        assert cli.main(["bench", *[a for a in TINY if a != "--no-progress"], "--variants", "reference",
                         "--peak-tflops", "1", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    doc = json.loads(out.read_text())
    assert doc["config"]["threads"] == 1 and "load_average_1min" in doc
    assert doc["config"]["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]  # PASSIVE unless set before
    captured = capsys.readouterr()
    assert ", 1 thread  (" in captured.out.splitlines()[0]
    assert "bench, timed steps (interleaved)" in captured.err and "100%" in captured.err
    assert "3/3 [" in captured.err  # 1 warm-up + 2 timed steps, with elapsed<remaining


def _doc(**config):
    return {"config": {"device": "cpu", "dtype": "fp32", "threads": 2, "omp_wait_policy": "PASSIVE", **config},
            "results": [{"mfu": 0.5}], "peak_source": "measured: 1024x1024 float32 matmul (p20)"}


def test_notes_under_the_table(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert report.notes(_doc()) == [] and report.notes(dict(_doc(), load_average_1min=0.3)) == []
    (busy,) = report.notes(dict(_doc(), load_average_1min=2.3))
    assert "load average 2.3 on 2 logical cores" in busy and "longer and noisier" in busy
    (spin,) = report.notes(dict(_doc(omp_wait_policy=None), load_average_1min=2.3))
    assert "spun" in spin and "OMP_WAIT_POLICY=PASSIVE" in spin and "--threads 1" in spin
    (one,) = report.notes(dict(_doc(threads=1, omp_wait_policy=None), load_average_1min=2.3))
    assert "longer and noisier" in one  # one thread cannot spin against another
    (bf16,) = report.notes(_doc(dtype="bf16"))
    assert "bf16 on a CPU" in bf16
    high = dict(_doc(), results=[{"mfu": 4.39}])
    (note,) = report.notes(high)
    assert "mfu above 1" in note and "--peak-tflops" in note
