"""`mae-fast sweep`: JSON, speedups consistent with images/s, a valid PNG, the theory column."""
import json

import pytest
import torch

from mae_fast.tools import cli, sweep, variants

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sweep_tiny_cpu(tmp_path, monkeypatch, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc = cli.main(["sweep", "--device", "cpu", "--batch-size", "1", "--steps", "1", "--warmup", "1", "--img-size", "16",
                   "--patch-sizes", "8,16", "--mask-ratios", "0.5,0.75", "--variants", "reference",
                   "--peak-tflops", "0.01", "--no-progress", "--json", str(out), "--plot", str(png), "--theory", "sample",
                   "--theory-size", "16", "--theory-rank", "8"])
    assert rc == 0
    doc = json.loads(out.read_text())
    for k in ("device", "versions", "commit", "command", "config", "results", "theory"):
        assert k in doc
    assert doc["config"]["mask_ratios"] == [0.0, 0.5, 0.75]  # ratio 0, the baseline, always added
    rows = {(r["patch_size"], r["mask_ratio"]): r for r in doc["results"]}
    # p=16 on 16 px is one patch: at ratio > 0 the MAE keeps none, so those points are not run, and say so
    assert set(rows) == {(8, 0.0), (8, 0.5), (8, 0.75), (16, 0.0)}
    assert [(x["patch_size"], x["mask_ratio"]) for x in doc["skipped_points"]] == [(16, 0.5), (16, 0.75)]
    text = capsys.readouterr().out
    assert "not run at p=16 (1 patches), ratio 0.5, 0.75: the MAE keeps no patch" in text
    n = torch.get_num_threads()
    assert f", {n} thread{'s' if n > 1 else ''}  (" in text.splitlines()[0]  # how many CPU threads ran the steps
    flagged = {(t["patch_size"], t["mask_ratio"]) for t in doc["theory"]["rows"] if t["flag"]}
    assert flagged == {(16, 0.5), (16, 0.75)}
    for (p, m), r in rows.items():
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and r["final_loss"] > 0
        assert r["ideal_encoder_speedup"] == pytest.approx(1 / (1 - m))
        assert r["speedup_vs_ratio0"] == pytest.approx(r["images_per_s"] / rows[(p, 0.0)]["images_per_s"])
        assert r["speedup_vs_reference"] == pytest.approx(1.0)
        assert r["predicted_mean_distance_px"] > 0 and "predicted_flag" not in r
        assert r["predicted_data_mean_distance_px"] > 0
    head = text.splitlines()[1].split()
    assert head[-2:] == ["predicted_mean_distance_px", "predicted_data_mean_distance_px"]
    assert any(line.startswith("predicted_* columns, model: linear") for line in text.splitlines())
    assert rows[(8, 0.0)]["speedup_vs_ratio0"] == 1.0
    # masking removes encoder work: fewer FLOPs per image as the ratio grows
    assert rows[(8, 0.0)]["flops_per_image"] > rows[(8, 0.5)]["flops_per_image"] > rows[(8, 0.75)]["flops_per_image"]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels: the second is speedup against the predicted scale
    no_theory = tmp_path / "no_theory.png"
    sweep.plot({**doc, "results": [{k: v for k, v in r.items() if not k.startswith("predicted_")}
                                   for r in doc["results"]]}, str(no_theory))
    single = matplotlib.image.imread(str(no_theory))
    assert single.shape[1] < 1.5 * single.shape[0]  # one panel without theory rows


def test_sweep_failing_variant_is_recorded(tmp_path, monkeypatch, capsys):
    """A variant that fails at a point (e.g. out of memory) gets an error row; the others still run."""
    def broken(cfg, device):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(variants.VARIANTS, "mae_fast", broken)
    monkeypatch.setattr(variants, "fast_models_module", lambda: None)
    out = tmp_path / "s.json"
    png = tmp_path / "s.png"
    assert cli.main(["sweep", "--device", "cpu", "--batch-size", "1", "--steps", "1", "--warmup", "1", "--img-size", "16",
                     "--patch-sizes", "8", "--mask-ratios", "0.5", "--peak-tflops", "0.01", "--no-progress",
                     "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["results"]
    table = capsys.readouterr().out.splitlines()
    failed = [line for line in table if " mae_fast " in line]
    assert len(failed) == 2 and all("failed" in line for line in failed)
    widths = {len(line) for line in table[1:6]}  # header, rule and rows: the message is not in the table
    assert len(widths) == 1
    assert "failed: p=8 ratio=0.5 mae_fast: RuntimeError: CUDA out of memory (simulated)" in table
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert {(r["variant"], r["mask_ratio"]) for r in rows} == {(v, m) for v in ("reference", "mae_fast") for m in (0.0, 0.5)}
    for r in rows:
        if r["variant"] == "mae_fast":
            assert "out of memory" in r["error"] and r["speedup_vs_ratio0"] is None
        else:
            assert r["images_per_s"] > 0
