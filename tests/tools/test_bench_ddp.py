"""`mae-fast bench` under torchrun: DistributedDataParallel with gloo on CPU, two processes."""
import json
import os
import subprocess
import sys

import pytest


def test_bench_ddp_gloo_two_processes(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="")  # one core per process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "mae_fast",
           "bench", "--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--img-size", "16",
           "--variants", "reference", "--peak-tflops", "0.01", "--no-progress", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("results written to") == 1  # rank 0 alone writes and prints
    doc = json.loads(out.read_text())
    assert doc["config"]["world_size"] == 2
    (r,) = doc["results"]
    per = r["images_per_s_per_device"]
    assert len(per) == 2 and all(v > 0 for v in per)
    assert r["images_per_s"] == pytest.approx(sum(per))
    assert per[0] == pytest.approx(2 / (r["step_ms_median"] / 1e3))  # rank 0's own steps
    assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 2 / 0.01e12)
    assert "DDP" in res.stdout
