"""The `mae_fast+graph` bench variant (mae_fast.TrainStep). On this CPU it runs eagerly and says so; the
CUDA graph timing itself runs on a GPU (scripts/gpu_check.sh graph-bench). ~5 s."""
import json

import pytest
import torch

import mae_fast.train
from mae_fast.tools import bench, cli, runner, variants

TINY = ["--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--img-size", "32", "--no-progress"]


def test_graph_variant_runs_train_step(tmp_path, monkeypatch, capsys):
    calls = []
    call = mae_fast.train.TrainStep.__call__

    def spy(self, imgs):
        calls.append(imgs.shape[0])
        return call(self, imgs)

    monkeypatch.setattr(mae_fast.train.TrainStep, "__call__", spy)
    out = tmp_path / "b.json"
    assert cli.main(["bench", *TINY, "--variants", "mae_fast,mae_fast+graph", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    fast, graph = doc["results"]
    assert graph["variant"] == "mae_fast+graph" and graph["steps"] == 2 and graph["final_loss"] > 0
    assert graph["cuda_graph"] is False and graph["graph_captures"] == 0 and "cuda_graph" not in fast
    assert graph["flops_counting"] == fast["flops_counting"]  # the same model, the same FLOPs
    assert calls == [2] * 3  # 1 warm-up + 2 timed steps, all through TrainStep
    assert "mae_fast+graph: ran eagerly" in capsys.readouterr().out
    assert "TrainStep" in doc["notes"]["graph"]


def test_graph_variant_defaults_and_refusals():
    cpu = bench.default_config("cpu", batch_size=2, steps=1, warmup=1)
    cpu.compile = True
    assert variants.resolve_variants(cpu)[0] == ["reference", "reference+compile", "mae_fast", "mae_fast+compile"]
    gpu = bench.BenchConfig(model="mae_vit_tiny_patch8", batch_size=2, steps=1, warmup=1, device="cuda")
    assert variants.resolve_variants(gpu) == (variants.ALL_VARIANTS, {})  # the default on a GPU: all five
    names, skipped = variants.resolve_variants(gpu, distributed=True)
    assert variants.GRAPH not in names and "DDP" in skipped[variants.GRAPH]
    gpu.dtype = "fp16"
    names, skipped = variants.resolve_variants(gpu)
    assert variants.GRAPH not in names and "fp16" in skipped[variants.GRAPH]
    gpu.variants = ["mae_fast+graph"]
    with pytest.raises(variants.VariantUnavailable, match="fp16"):
        variants.resolve_variants(gpu)
    with pytest.raises(SystemExit, match="fp16"):
        cli.main(["bench", *TINY, "--variants", "mae_fast+graph", "--dtype", "fp16"])


class _FakeGraphStep:
    """Stands in for a graphed TrainStep: captured at its 4th call."""
    graphed = True

    def __init__(self):
        self.calls = 0
        self.captures = 0

    @property
    def captured(self):
        return self.calls >= 4

    def __call__(self, imgs):
        self.calls += 1
        return torch.zeros(())


def test_warm_up_steps_until_captured(monkeypatch):
    """Timed +graph steps must all be replays: warm-up goes on past --warmup until the capture, and records
    the allocator peak of the capturing step (what the graph's memory pool keeps)."""
    cfg = bench.default_config("cpu", batch_size=1, steps=1, warmup=1, img_size=16)
    r = runner.Runner("mae_fast+graph", cfg, torch.device("cpu"), [torch.randn(1, 3, 16, 16)], distributed=False)
    assert isinstance(r.train_step, mae_fast.TrainStep) and not r.graphed  # CPU: eager
    r.train_step = _FakeGraphStep()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12345)
    r.warm_up(2)
    assert r.train_step.calls == 4 and r.capture_peak_bytes == 12345
    r.warm_up(2)  # captured already: exactly n steps
    assert r.train_step.calls == 6
