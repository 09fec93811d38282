"""`mae-fast pretrain` under torchrun: two CPU processes (gloo) train as one process does.

One torchrun launch (tests/tools/pretrain_ddp_worker.py) runs, in both processes: A, 6 steps of 4 images
(2 per process), keeping its step-3 checkpoint; B, A resumed from step 3; C, 3 steps of 2 micro-batches of 4
(--accum-iter 2); and three commands that must fail. The one-process runs it is compared with run here.
The folder holds an unreadable file, which both processes meet. Tiny model, 32 px; the module takes about
20 s on a 2-core CPU (the torchrun launch about 14 s of it).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.tools import cli

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu", "--lr", "1e-3",
        "--log-every", "1", "--threads", "1"]
LOSS = dict(rel=1e-6, abs=0)  # fp32 reduction order (measured: at most 1e-7 relative apart)


def _log(folder) -> list:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]


def _losses(folder) -> list:
    return [x["loss"] for x in _log(folder)]


@pytest.fixture(autouse=True)
def _threads():
    """The one-process runs here take --threads 1; the rest of the session keeps its thread count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """(images, output folder, stdout) of the torchrun launch."""
    root = tmp_path_factory.mktemp("ddp")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 3, 6, 8))).float(), size=(40, 52),
                                                 mode="bicubic").clamp(0, 1)
        Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(images / f"{k}.png")
    (images / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    out = root / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "pretrain_ddp_worker.py"), str(images), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # a hung worker is killed with its group below
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return images, out, stdout


def _one_process(images, folder, *argv):
    assert cli.main(["pretrain", str(images), *TINY, *argv, "--output-dir", str(folder)]) == 0


def test_two_processes_train_as_one(ddp, tmp_path):
    """The same images, crops, flips and masks, whatever the rank: the losses of 6 steps equal one process's
    to fp32 reduction order (weights are not compared: AdamW moves a weight whose gradient is near 0 by ~lr
    either way, so rounding can move it 1e-4 apart); the unreadable file is counted once, as one process does."""
    images, out, _ = ddp
    _one_process(images, tmp_path / "one", "--steps", "6")
    two, one = _log(out / "A"), _log(tmp_path / "one")
    assert [x["step"] for x in two] == list(range(1, 7))  # one line per step: rank 0 alone writes
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], **LOSS)
    assert len({x["loss"] for x in two}) == 6
    assert all(x["world_size"] == 2 and x["accum_iter"] == 1 for x in two)
    assert all(x["world_size"] == 1 for x in one)
    assert all(len(x["data_wait_s_per_rank"]) == 2 and x["data_wait_s"] == max(x["data_wait_s_per_rank"])
               for x in two)
    assert two[-1]["skipped_files"] == one[-1]["skipped_files"] == 1
    a = torch.load(out / "A" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["step"] == b["step"] == 6


def test_files_written_once_by_rank_zero(ddp):
    images, out, stdout = ddp
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["saves"] == [[str(out / "A"), 3], [str(out / "A"), 6], [str(out / "B"), 6], [str(out / "C"), 3]]
    assert ranks[1]["saves"] == []
    assert sorted(os.listdir(out / "A")) == ["at3.pth", "checkpoint.pth", "log.jsonl", "recon_000006.png"]
    assert stdout.count("trained steps 1-6") == 1 and stdout.count("pretrain mae_vit_tiny_patch8") == 3
    assert "6 steps of 4 (2 processes x 2)" in stdout and "DDP over gloo, eager steps" in stdout
    assert "(1 unreadable file skipped)" in stdout


def test_resume_continues_exactly(ddp):
    """B (A's step-3 checkpoint, resumed by two processes) ends where A ended, bit for bit."""
    _, out, _ = ddp
    a = torch.load(out / "A" / "checkpoint.pth", weights_only=True)
    b = torch.load(out / "B" / "checkpoint.pth", weights_only=True)
    assert _losses(out / "B") == _losses(out / "A")[3:]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[k], b["optimizer"]["state"][i][k]) for k in s)


def test_resume_at_another_world_size(ddp, tmp_path, capsys):
    """One process continues the two processes' run: it says what holds, and the losses follow A's to fp32
    reduction order."""
    images, out, _ = ddp
    _one_process(images, tmp_path / "r", "--steps", "6", "--resume", str(out / "A" / "at3.pth"))
    assert "resumed at step 3 of a run on 2 processes (the same images, crops, masks and schedule" in \
        capsys.readouterr().out
    assert _losses(tmp_path / "r") == pytest.approx(_losses(out / "A")[3:], **LOSS)


def test_accumulation_equals_the_large_batch(ddp, tmp_path):
    """2 processes x 2 images x 2 micro-batches (C), 1 process x 4 images x 2 micro-batches, and 1 process x 8
    images: the same 8 images per step, the same losses to fp32 rounding (the lr is given: test_pretrain checks
    the blr rule on the effective batch)."""
    images, out, _ = ddp
    _one_process(images, tmp_path / "large", "--steps", "3", "--batch-size", "8")
    _one_process(images, tmp_path / "accum", "--steps", "3", "--accum-iter", "2")
    large = _losses(tmp_path / "large")
    assert _losses(out / "C") == pytest.approx(large, **LOSS)
    assert _losses(tmp_path / "accum") == pytest.approx(large, **LOSS)
    assert [x["accum_iter"] for x in _log(out / "C")] == [2, 2, 2]


def test_errors_said_once(ddp):
    """A batch that does not split, the GPU loader on CPU processes, a missing checkpoint: every process
    stops, rank 0 says why."""
    _, out, _ = ddp
    ranks = [json.loads((out / f"rank{r}.json").read_text())["exits"] for r in (0, 1)]
    assert ranks[1] == {"batch": 1, "loader": 1, "resume": 1}
    assert "--batch-size 3 is the global batch" in ranks[0]["batch"] and "split evenly over the 2 processes" in \
        ranks[0]["batch"]
    assert "--loader gpu decodes on a CUDA device, and this run is on CPU processes" in ranks[0]["loader"]
    assert "--resume: no checkpoint at" in ranks[0]["resume"]
    assert all(x.startswith("mae-fast pretrain: ") for x in ranks[0].values())
