"""`mae-fast bench` (what `make bench` runs) and the package layout."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import mae_fast
from mae_fast import benchmark, cli


def test_bench_tiny_cpu_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--device", "cpu", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                   "--img-size", "32", "--json", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in ("device", "versions", "commit", "command", "config", "results"):
        assert key in doc
    assert doc["command"].startswith("mae-fast bench")
    assert doc["config"]["model"] == "mae_vit_tiny_patch8" and doc["config"]["dtype"] == "fp32"
    (r,) = doc["results"]
    assert r["variant"] == "reference" and r["steps"] == 3
    assert r["step_ms_p20"] <= r["step_ms_median"] <= r["step_ms_p80"]
    assert r["images_per_s"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
    assert r["speedup_vs_reference"] == 1.0 and r["final_loss"] > 0
    table = capsys.readouterr().out
    assert "images_per_s" in table and "reference" in table


def test_bench_trains(tmp_path):
    """The timed step really updates the weights (forward, backward, optimizer step)."""
    cfg = benchmark.default_config("cpu", batch_size=2, steps=1, warmup=1, img_size=32)
    cfg.img_size = 32
    torch.manual_seed(cfg.seed)
    before = benchmark.build_reference(cfg, torch.device("cpu")).state_dict()["blocks.0.attn.qkv.weight"].clone()
    calls = []
    orig = benchmark.VARIANTS["reference"]

    def spy(c, d):
        m = orig(c, d)
        calls.append(m)
        return m

    benchmark.VARIANTS["reference"] = spy
    try:
        benchmark.run(cfg, progress=False)
    finally:
        benchmark.VARIANTS["reference"] = orig
    after = calls[0].state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(before, after)


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
    (["bench", "--steps", "x"], "--steps must be an integer"),
    (["bench", "--dtype", "int8"], "invalid choice"),
])
def test_bench_bad_flags(argv, msg, capsys):
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


def test_extension_and_layout(tmp_path):
    assert isinstance(mae_fast._C.cuda_compiled(), bool)
    assert importlib.import_module("mae_fast.kernels").__name__ == "mae_fast.kernels"  # kernels/ installed as a subpackage

    # no top-level `kernels` module (the name is taken on PyPI): import from a neutral folder
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('kernels') is None else 1)"
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert res.returncode == 0, "a top-level `kernels` module is importable"
