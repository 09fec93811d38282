"""`mae-fast pretrain`: MAE pretraining on a folder of images, with the official recipe.

Built on the library's own pieces: the fast model (``mae_fast.models``) trained by ``mae_fast.TrainStep``
(on CUDA the whole step is one CUDA graph replay). The recipe is the official one (He et al. 2021,
``main_pretrain.py``):

- data: RandomResizedCrop (area 20-100 %, aspect 3/4-4/3, bicubic), horizontal flip with probability 1/2,
  ImageNet mean/std normalisation (``mae_fast.data``: Pillow in loader workers on a CPU; on CUDA the JPEGs
  are decoded on the GPU by nvJPEG and one kernel makes the batch; the same samples either way);
- AdamW with betas (0.9, 0.95) and weight decay 0.05, none on biases and other 1-D parameters;
- learning rate ``blr * batch / 256`` (``--lr`` sets it directly), linear warm-up then cosine decay to
  ``min_lr``, per step (the official schedule is per iteration too, in fractional epochs);
- the normalized-pixel loss (``norm_pix_loss``), mask ratio 0.75.

Data order is reproducible and independent of the number of loader workers: the batches are consecutive
pieces of an endless sequence of shuffled epochs (epoch e is a permutation seeded by (seed, e)), and each
sample's crop and flip come from a generator seeded by its position in that sequence. So a resumed run
reads exactly the images an uninterrupted run would, and a folder with fewer images than a batch works.
An unreadable file is replaced by the next readable image, reported once and counted in the log.

Output folder: ``checkpoint.pth`` (the latest: model, optimizer, scheduler, step, RNG states, the config;
``model`` has the official MAE's keys), ``recon_<step>.png`` (original / masked / reconstruction /
reconstruction with the visible patches pasted back, for a few fixed images and a fixed mask) and
``log.jsonl`` (one JSON line per logged step). A folder that holds a checkpoint is only continued
(``resume``), never started over. One process, one device.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..data import (CACHE_MAX_IMAGES, LOADERS, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                    Batches, ImageFolder, StreamSampler, center_box, default_workers, find_images, load_rgb,
                    random_resized_crop_box, resolve_loader, sample_images, to_pixels, to_tensor)
from . import checks, defaults
from .progress import bar as progress_bar

CHECKPOINT = "checkpoint.pth"


@dataclass
class PretrainConfig:
    """One pretraining run. ``images``: a folder (searched recursively), or None for the sample photographs
    shipped with scikit-image. Sizes left None take the device's default (``defaults.PRETRAIN``) or the
    model's own (``img_size``)."""

    images: Optional[str] = None
    output_dir: str = "output_dir"
    model: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: Optional[int] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None  # instead of steps: passes over the images
    warmup_steps: Optional[int] = None  # None: 5 % of the steps (the official 40 of 800 epochs)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    blr: float = 1.5e-4
    lr: Optional[float] = None  # None: blr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    grad_clip: Optional[float] = None  # the official pretraining does not clip
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    workers: Optional[int] = None  # None: min(8, cores // 2 - 1)
    loader: str = "auto"  # "gpu" (nvJPEG + one kernel) on CUDA, "cpu" (Pillow in the workers) elsewhere
    seed: int = 0
    log_every: int = 10
    save_every: Optional[int] = None  # steps between checkpoints (0: only at the end)
    recon_every: Optional[int] = None  # steps between reconstruction pictures (0: only at the end)
    recon_images: int = 4
    resume: Optional[str] = None  # a checkpoint to continue from

    def resolved_device(self) -> torch.device:
        return checks.device(self.device)

    def resolve(self, num_images: int) -> "PretrainConfig":
        """A copy with every default filled in (device-dependent sizes, steps from epochs, lr, warm-up); ValueError
        naming the flag when the sizes make no model that keeps a patch."""
        kind = "cuda" if self.resolved_device().type == "cuda" else "cpu"
        table = defaults.PRETRAIN[kind]
        out = PretrainConfig(**asdict(self))
        out.device = str(self.resolved_device())
        out.model = out.model or table["model"]
        out.batch_size = out.batch_size or table["batch_size"]
        for key in ("save_every", "recon_every"):
            if getattr(out, key) is None:
                setattr(out, key, table[key])
        if out.img_size is None:
            from ..configs import config

            out.img_size = int(config(out.model).get("img_size", 224))
        if out.steps is None:
            out.steps = (max(1, math.ceil(out.epochs * num_images / out.batch_size)) if out.epochs is not None
                         else table["steps"])
        out.epochs = None
        if out.warmup_steps is None:
            out.warmup_steps = out.steps // 20
        if out.lr is None:
            out.lr = out.blr * out.batch_size / 256
        if out.dtype == "auto":
            out.dtype = "bf16" if kind == "cuda" else "fp32"
        if out.workers is None:
            out.workers = default_workers()
        out.loader = resolve_loader(out.loader, self.resolved_device())
        checks.sizes(out.model, out.img_size, None, out.mask_ratio)
        if out.warmup_steps > out.steps:
            raise ValueError(f"--warmup-steps {out.warmup_steps} is more than --steps {out.steps}")
        return out


# -------------------------------------------------------------------------------------- optimisation
def lr_at(step: int, cfg: PretrainConfig) -> float:
    """The official schedule, per step: linear warm-up from 0, then half a cosine from lr to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices and tokens, none on biases and norms (1-D), as the official recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build(cfg: PretrainConfig):
    """(model, optimizer, scheduler) of a resolved config, on its device."""
    from .. import models

    device = torch.device(cfg.device)
    model = models.create_model(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss).to(device)
    graph = dict(fused=True, capturable=True) if device.type == "cuda" else {}
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg) / cfg.lr)
    return model, opt, sched


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, opt, sched, step: int, cfg: PretrainConfig) -> None:
    """Write atomically (a file next to it, then renamed): a crash never leaves half a checkpoint."""
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "config": asdict(cfg),
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


# Flags a resumed run cannot change: the data stream position (step x batch size) and the random streams
# (masks, data order) continue the checkpoint's.
_FIXED_ON_RESUME = (("batch_size", "--batch-size", "the data stream goes on at sample step x batch size"),
                    ("seed", "--seed", "the random streams (masks, data order) go on from the checkpoint's"))


def load_checkpoint(path, model, opt, sched, cfg: PretrainConfig) -> int:
    """Restore model, optimizer state, scheduler position and RNG states; returns the step to continue from.

    The run's own settings win over the checkpoint's: the optimizer's hyperparameters (lr, weight decay,
    its device options) and the schedule (lr, min_lr, warm-up, steps) are those of ``cfg``, as the log and
    the saved config report them; the optimizer keeps only its state (moments, step counts) from the file.
    A ``cfg`` that changes what cannot change (:data:`_FIXED_ON_RESUME`) is a ValueError naming the flag."""
    state = read_checkpoint(path)
    was = state.get("config", {})
    for key, flag, why in _FIXED_ON_RESUME:
        if key in was and was[key] != getattr(cfg, key):
            raise ValueError(f"{flag} {getattr(cfg, key)}: {path} was trained with {flag} {was[key]}, which a resumed "
                             f"run keeps ({why}); resume with {flag} {was[key]}, or start a new run")
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


# --------------------------------------------------------------------------------- reconstructions
@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0):
    """(masked, reconstruction, reconstruction with the visible patches) for ``imgs`` [N, 3, H, W], with a
    fixed mask (noise from ``seed``). With norm_pix_loss the model predicts each patch normalised by its own
    mean and variance; they are taken from the true patch to draw it (the usual way to show such a model)."""
    N, L = imgs.shape[0], model.patch_embed.num_patches
    noise = torch.rand(N, L, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs.float())
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)  # [N, 3, H, W]
    p = model.patch_size
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * 3))  # 1 where removed
    masked = imgs * (1 - removed)  # removed patches drawn in the mean colour (0 after normalisation)
    pasted = imgs * (1 - removed) + recon * removed
    return masked, recon, pasted


def save_reconstructions(path, model, imgs: torch.Tensor, mask_ratio: float, step: int) -> None:
    """A PNG grid: one row per image; original (headed by the step), masked, reconstruction, reconstruction with
    the visible patches pasted back."""
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == "cuda" else []):
        masked, recon, pasted = reconstruct(model, imgs, mask_ratio)  # leaves the training RNG untouched
    columns = [f"step {step}", "masked", "reconstruction", "+ visible"]  # the first column: the originals
    size = imgs.shape[-1]
    zoom = max(1, 128 // size)  # small images are drawn larger (nearest neighbour)
    cell, gap, head = size * zoom, 4, 14
    grid = Image.new("RGB", (len(columns) * (cell + gap) + gap, head + imgs.shape[0] * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((gap + c * (cell + gap), 2), name, fill="black")
    for r in range(imgs.shape[0]):
        for c, x in enumerate((imgs[r], masked[r], recon[r], pasted[r])):
            tile = Image.fromarray(to_pixels(x)).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (gap + c * (cell + gap), head + gap + r * (cell + gap)))
    grid.save(path)


# ------------------------------------------------------------------------------------------- the run
def check_config(cfg: PretrainConfig) -> None:
    """ValueError naming the flag for settings that cannot run (before anything is loaded; the sizes, which
    need the model's defaults, are checked by :meth:`PretrainConfig.resolve`)."""
    checks.model(cfg.model)
    if cfg.mask_ratio == 0.0:
        raise ValueError("--mask-ratio 0 removes no patch, and the MAE loss is computed on the removed patches: "
                         "pretraining needs a ratio in (0, 1) (bench and sweep time ratio 0 as the unmasked step)")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    for flag, v in (("--lr", cfg.lr), ("--blr", cfg.blr), ("--epochs", cfg.epochs), ("--grad-clip", cfg.grad_clip)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{flag} must be a positive number, got {v}")
    if not (cfg.min_lr >= 0 and math.isfinite(cfg.min_lr)):
        raise ValueError(f"--min-lr must be a number >= 0, got {cfg.min_lr}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ValueError(f"--weight-decay must be a number >= 0, got {cfg.weight_decay}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give either --steps or --epochs, not both")
    if cfg.dtype == "fp16":
        raise ValueError("--dtype fp16 needs loss scaling, which TrainStep does not do; use bf16")
    dev = checks.device(cfg.device)
    if cfg.loader not in LOADERS:
        raise ValueError(f"--loader {cfg.loader!r}: choose one of {', '.join(LOADERS)}")
    if cfg.loader == "gpu" and dev.type != "cuda":
        raise ValueError("--loader gpu decodes on a CUDA device, and this run is on the CPU (use --loader cpu or auto)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run(cfg: PretrainConfig, progress: bool = True, say=print) -> dict:
    """Train; returns a summary (steps, final loss, paths). ``say`` prints the start and end lines."""
    from ..train import TrainStep

    check_config(cfg)
    paths = sample_images() if cfg.images is None else find_images(cfg.images)
    cfg = cfg.resolve(len(paths))
    device = torch.device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model, opt, sched = build(cfg)
    start = 0
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / CHECKPOINT)
    if not resume and (out / CHECKPOINT).exists():
        raise ValueError(f"{out / CHECKPOINT} exists: --resume continues that run; to start a new one, give another "
                         "--output-dir (or remove the old run)")
    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f"--resume: no checkpoint at {resume}")
        start = load_checkpoint(resume, model, opt, sched, cfg)
        if start >= cfg.steps:
            raise ValueError(f"--resume: {resume} is at step {start}, already at --steps {cfg.steps}; give more "
                             "--steps to train on")
    step_fn = TrainStep(model, opt, cfg.mask_ratio, amp=None if cfg.dtype == "fp32" else cfg.dtype,
                        grad_clip=cfg.grad_clip, scheduler=sched)
    fixed = ImageFolder(paths, cfg.img_size, cfg.seed).fixed(cfg.recon_images).to(device)

    def skipped(path: str, why: str) -> None:
        with tqdm.external_write_mode():
            say(f"pretrain: skipped an unreadable file, the next readable image takes its samples: {why}")

    batches = Batches(paths, cfg.img_size, cfg.batch_size, seed=cfg.seed, start_step=start, workers=cfg.workers,
                      device=device, loader=cfg.loader, on_skip=skipped)

    source = "the sample photographs" if cfg.images is None else cfg.images
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = f", {_plural(torch.get_num_threads(), 'thread')}" if device.type == "cpu" else ""
    say(f"pretrain {cfg.model} ({n_params / 1e6:.1f}M parameters) at {cfg.img_size}px on {len(paths)} images from "
        f"{source}: {cfg.steps} steps of {cfg.batch_size} "
        f"({cfg.steps * cfg.batch_size / len(paths):.1f} epochs), mask ratio {cfg.mask_ratio:g}, lr {cfg.lr:.3g} "
        f"(warm-up {_plural(cfg.warmup_steps, 'step')}, cosine to {cfg.min_lr:g}), {cfg.dtype} on {device}{threads}, "
        f"{cfg.loader} loader with {_plural(cfg.workers, 'worker')}"
        + (f"; resumed at step {start}" if start else ""))

    log = open(out / "log.jsonl", "a")
    ckpt, recon = out / CHECKPOINT, None
    loss_sum = torch.zeros((), device=device)
    last_loss, count = float("nan"), 0
    t_run = t_log = time.perf_counter()
    wait_log = 0.0
    saved_at = recon_at = -1
    try:
        with progress_bar(cfg.steps, "pretrain", enabled=progress, initial=start) as bar:
            for step in range(start, cfg.steps):
                imgs = next(batches)
                loss_sum += step_fn(imgs)
                count += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    last_loss = float(loss_sum) / count  # one host sync per logged interval
                    now = time.perf_counter()
                    ips = count * cfg.batch_size / (now - t_log)
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(f"the loss is {last_loss} at step {done}; lower --lr or --blr")
                    lr = lr_at(step, cfg)
                    bar.set_postfix_str(f"loss {last_loss:.4f}, lr {lr:.2e}, {ips:.0f} img/s", refresh=False)
                    log.write(json.dumps({"step": done, "loss": last_loss, "lr": lr, "images_per_s": ips,
                                          "elapsed_s": now - t_run, "data_wait_s": (batches.wait_s - wait_log) / count,
                                          "skipped_files": len(batches.skips)}) + "\n")
                    log.flush()
                    loss_sum.zero_()
                    count, t_log, wait_log = 0, time.perf_counter(), batches.wait_s
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    save_checkpoint(ckpt, model, opt, sched, done, cfg)
                    saved_at = done
                if cfg.recon_every and done % cfg.recon_every == 0 and done < cfg.steps:
                    recon = out / f"recon_{done:06d}.png"
                    save_reconstructions(recon, model, fixed, cfg.mask_ratio, done)
                    recon_at = done
                bar.update(1)
        if saved_at != cfg.steps:
            save_checkpoint(ckpt, model, opt, sched, cfg.steps, cfg)
        if recon_at != cfg.steps:
            recon = out / f"recon_{cfg.steps:06d}.png"
            save_reconstructions(recon, model, fixed, cfg.mask_ratio, cfg.steps)
    finally:
        log.close()
        batches.close()
    elapsed = time.perf_counter() - t_run
    skips = f" ({_plural(len(batches.skips), 'unreadable file')} skipped)" if len(batches.skips) else ""
    say(f"trained steps {start + 1}-{cfg.steps} in {_duration(elapsed)}, final loss {last_loss:.4f}{skips}: checkpoint "
        f"{ckpt}, reconstructions {recon}, log {out / 'log.jsonl'}")
    return {"config": asdict(cfg), "start_step": start, "steps": cfg.steps, "final_loss": last_loss,
            "checkpoint": str(ckpt), "reconstruction": str(recon), "log": str(out / "log.jsonl"),
            "seconds": elapsed, "skipped_files": dict(batches.skips.files), "data_wait_s": batches.wait_s}


def config_from_args(args) -> PretrainConfig:
    """A PretrainConfig from parsed `mae-fast pretrain` arguments (same names)."""
    kwargs = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if hasattr(args, f.name)}
    return PretrainConfig(**kwargs)

