"""`mae-fast pretrain --resume`: a file that is not a checkpoint is a one-line error; flags that differ from
the checkpoint's are applied and recorded (the optimizer's learning rate, weight decay and schedule, in the
run, the log and the saved config alike) or refused naming the flag (--batch-size: the data stream position
depends on it); never run one thing and report another."""
import json
import math

import pytest
import torch

from mae_fast.tools import cli, pretrain

TINY = ["--sample", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu",
        "--recon-every", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint a 2-step run saves at its end (on the plain CPU path, as the tests: a module fixture is
    made before the function-scoped one of conftest.py that sets it)."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        assert cli.main(["pretrain", *TINY, "--steps", "2", "--output-dir", str(out)]) == 0
    return out / "checkpoint.pth"


def _fail(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", *argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("mae-fast pretrain: ") and "\n" not in msg, msg
    return msg


def _write(kind, path, good):
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([1, 2], path)
    else:
        state = torch.load(good, weights_only=True)
        if kind == "no_rng_torch":
            state["rng"] = {}
        elif kind == "optimizer_garbage":
            state["optimizer"] = {"x": 1}
        elif kind == "scheduler_garbage":
            state["scheduler"] = [1]
        elif kind == "step_garbage":
            state["step"] = "two"
        elif kind == "model_garbage":
            state["model"] = {"w": "x"}
        elif kind == "other_optimizer":  # one param group instead of two
            state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
        torch.save(state, path)


@pytest.mark.parametrize("kind", ["text", "empty", "tensor", "list", "no_rng_torch", "optimizer_garbage",
                                  "scheduler_garbage", "step_garbage", "model_garbage", "other_optimizer"])
def test_not_a_checkpoint_is_a_one_line_error(tmp_path, checkpoint, kind):
    bad = tmp_path / "bad.pth"
    _write(kind, bad, checkpoint)
    msg = _fail([*TINY, "--steps", "4", "--resume", str(bad), "--output-dir", str(tmp_path / "out")])
    assert f"--resume: {bad}" in msg


def _resume(checkpoint, tmp_path, *flags):
    out = tmp_path / "resumed"
    assert cli.main(["pretrain", *TINY, "--steps", "4", "--log-every", "1", "--resume", str(checkpoint),
                     "--output-dir", str(out), *flags]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return state, log


def test_new_lr_and_weight_decay_are_applied_and_recorded(tmp_path, checkpoint, monkeypatch):
    """--lr, --min-lr, --warmup-steps and --weight-decay given on resume: the optimizer steps with them (each
    step's lr is the new schedule's, as the log says) and the saved config says the same."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):  # the hyperparameters each optimizer step really uses
        seen.append([(float(g["lr"]), g["weight_decay"]) for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    state, log = _resume(checkpoint, tmp_path, "--lr", "1e-3", "--min-lr", "1e-5", "--warmup-steps", "1",
                         "--weight-decay", "0.2")
    cfg = pretrain.PretrainConfig(**state["config"])
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.weight_decay) == (1e-3, 1e-5, 1, 0.2)
    assert [x["step"] for x in log] == [3, 4]
    for step, used in zip((2, 3), seen):
        want = pretrain.lr_at(step, cfg)
        assert all(math.isclose(lr, want, rel_tol=1e-6) for lr, _ in used), (step, used, want)
        assert sorted(wd for _, wd in used) == [0.0, 0.2]  # none on biases and norms, the new value elsewhere
    for entry, step in zip(log, (2, 3)):
        assert math.isclose(entry["lr"], pretrain.lr_at(step, cfg), rel_tol=1e-9)
    groups = state["optimizer"]["param_groups"]
    assert all(g["initial_lr"] == 1e-3 for g in groups) and state["scheduler"]["base_lrs"] == [1e-3, 1e-3]


def test_unchanged_flags_continue_exactly(tmp_path, checkpoint):
    """The same flags: the optimizer's hyperparameters are the checkpoint's (the exact-resume test in
    test_pretrain.py checks the weights bit for bit)."""
    state, _ = _resume(checkpoint, tmp_path)
    before = torch.load(checkpoint, weights_only=True)
    for a, b in zip(state["optimizer"]["param_groups"], before["optimizer"]["param_groups"]):
        assert {k: v for k, v in a.items() if k not in ("lr", "params")} == \
               {k: v for k, v in b.items() if k not in ("lr", "params")}


def test_new_batch_size_is_refused_naming_the_flag(tmp_path, checkpoint):
    argv = [*TINY, "--steps", "4", "--resume", str(checkpoint), "--output-dir", str(tmp_path / "out")]
    argv[argv.index("--batch-size") + 1] = "2"
    msg = _fail(argv)
    assert "--batch-size 2" in msg and "4" in msg
