"""`mae-fast profile`: categories add up to the step, the expected parts show up, a Chrome trace is written."""
import gzip
import json

from mae_fast.tools import cli, profile


def test_profile_tiny_cpu(tmp_path, capsys):
    out, traces = tmp_path / "p.json", tmp_path / "traces"
    rc = cli.main(["profile", "--device", "cpu", "--batch-size", "2", "--warmup", "1", "--img-size", "16",
                   "--variants", "reference,mae_fast", "--json", str(out), "--trace", str(traces)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["results"]] == ["reference", "mae_fast"]
    for r in doc["results"]:
        cats = r["categories"]
        assert list(cats) == profile.CATEGORIES
        assert abs(sum(c["ms"] for c in cats.values()) - r["step_ms"]) < 1e-6 * max(1.0, r["step_ms"])
        assert abs(sum(c["fraction"] for c in cats.values()) - 1) < 1e-9
        for part in ("patch_embed", "attention", "gemm", "norm", "loss", "optimizer", "masking"):
            assert cats[part]["ms"] > 0, (r["variant"], part)
        assert r["top_ops"] and r["top_ops"][0]["self_ms"] >= r["top_ops"][-1]["self_ms"]
        assert r["trace"].endswith(".json.gz")
        trace = json.loads(gzip.open(r["trace"]).read())
        assert trace["traceEvents"]
    ref = doc["results"][0]["categories"]
    assert ref["unshuffle"]["ms"] > 0 and ref["gather"]["ms"] > 0  # the reference's cat/gather steps
    text = capsys.readouterr().out
    assert "optimizer" in text and "Chrome trace" in text
