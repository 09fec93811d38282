"""`mae-fast pretrain`'s checkpoints: written atomically, read with a one-line error for any file that is not
one, and resumed with the run's own settings winning over the checkpoint's (docs/PRETRAIN.md)."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Optional

import torch

from . import distributed as dist

if TYPE_CHECKING:
    from .pretrain import PretrainConfig


def save_checkpoint(path, model, opt, sched, step: int, cfg: PretrainConfig) -> None:
    """Write atomically (a file next to it, then renamed): a crash never leaves half a checkpoint. Under
    torchrun only rank 0 calls this; ``world_size`` records the number of processes."""
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "world_size": dist.world_size(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _checkpoint_problem(state) -> Optional[str]:
    """What makes ``state`` (a loaded file) no checkpoint of this tool, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("step", int), ("rng", dict)):
        if key not in state:
            return f"no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its {key!r} is a {type(state[key]).__name__}"
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "its 'model' holds values that are not tensors"
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return "its 'optimizer' is no optimizer state (no 'state' and 'param_groups')"
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("cuda", []), (list, tuple)):
        return "its 'rng' holds no random generator states"
    if not isinstance(state.get("config", {}), dict):
        return "its 'config' is no dict"
    return None


def read_checkpoint(path) -> dict:
    """The checkpoint at ``path``, checked to be one of this tool's; a one-line ValueError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any file: not a torch file, truncated, a pickle torch will not load
        first = (str(e).strip().splitlines() or [""])[0][:200] or "the file is empty or truncated"
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint ({type(e).__name__}: {first})") from None
    problem = _checkpoint_problem(state)
    if problem:
        raise ValueError(f"--resume: {path} is not a `mae-fast pretrain` checkpoint ({problem})")
    return state


# Flags a resumed run cannot change: what a step is (its images: the data stream goes on at step x images per
# step, and the schedule counts steps) and the random streams (masks, data order) continue the checkpoint's.
# The number of processes may change (docs/PRETRAIN.md).
_FIXED_ON_RESUME = (("batch_size", "--batch-size", None, "the data stream goes on at sample step x batch size"),
                    ("accum_iter", "--accum-iter", 1, "a step is --batch-size x --accum-iter images"),
                    ("seed", "--seed", None, "the random streams (masks, data order) go on from the checkpoint's"))


def check_resume(state: dict, cfg: PretrainConfig, path) -> None:
    """ValueError naming the flag when ``cfg`` changes what a resumed run cannot (:data:`_FIXED_ON_RESUME`)."""
    was = state.get("config", {})
    for key, flag, default, why in _FIXED_ON_RESUME:
        old = was.get(key, default)
        if old is not None and old != getattr(cfg, key):
            raise ValueError(f"{flag} {getattr(cfg, key)}: {path} was trained with {flag} {old}, which a resumed "
                             f"run keeps ({why}); resume with {flag} {old}, or start a new run")


def load_checkpoint(path, model, opt, sched, state: dict) -> int:
    """Restore model, optimizer state, scheduler position and RNG states from ``state`` (read from ``path``);
    returns the step to continue from.

    The run's own settings win over the checkpoint's: the optimizer's hyperparameters (lr, weight decay, its
    implementation flags: fused, capturable, so a graph run and an eager DDP run continue each other) and the
    schedule (lr, min_lr, warm-up, steps) are this run's, as the log and the saved config report them; the
    optimizer keeps only its state (moments, step counts) from the file."""
    was = state.get("config", {})
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"--resume: {path} holds a {was.get('model')} model at {was.get('img_size')}px, which does "
                         f"not load into this one: {str(e).strip().splitlines()[0]}") from None
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # from cfg
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng_torch = state["rng"]["torch"]
        torch.set_rng_state(rng_torch)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ValueError(f"--resume: {path} does not fit this run's optimizer, scheduler or random state "
                         f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})") from None
    for group, own in zip(opt.param_groups, settings):
        group.update(own)  # this run's hyperparameters; a CUDA graph run saved lr as a tensor, TrainStep makes its own
        if group.get("capturable") or group.get("fused"):  # their step counts live on the parameters' device
            for p in group["params"]:
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"] = opt.state[p]["step"].to(dtype=torch.float32, device=p.device)
    sched.base_lrs = [own["initial_lr"] for own in settings]  # the schedule of cfg from the restored position on
    for group, base, lmbda in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lmbda(sched.last_epoch)  # what LambdaLR.step computes, bit for bit
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    if state["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"][: torch.cuda.device_count()])
    return int(state["step"])
