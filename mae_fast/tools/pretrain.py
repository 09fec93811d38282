"""`mae-fast pretrain`: MAE pretraining on a folder of images, with the official recipe.

Built on the library's own pieces: the fast model (``mae_fast.models``) trained by ``mae_fast.TrainStep``
(on CUDA the whole step is one CUDA graph replay). The recipe is the official one (He et al. 2021,
``main_pretrain.py``):

- data: RandomResizedCrop (area 20-100 %, aspect 3/4-4/3, bicubic), horizontal flip with probability 1/2,
  ImageNet mean/std normalisation (``mae_fast.data``: Pillow in loader workers on a CPU; on CUDA the JPEGs
  are decoded on the GPU by nvJPEG and one kernel makes the batch; the same samples either way);
- AdamW with betas (0.9, 0.95) and weight decay 0.05, none on biases and other 1-D parameters;
- learning rate ``blr * images per step / 256`` (``--lr`` sets it directly), linear warm-up then cosine decay
  to ``min_lr``, per step (the official schedule is per iteration too, in fractional epochs);
- the normalized-pixel loss (``norm_pix_loss``), mask ratio 0.75.

Data order is reproducible and independent of the number of loader workers: the batches are consecutive
pieces of an endless sequence of shuffled epochs (epoch e is a permutation seeded by (seed, e)), and each
sample's crop and flip come from a generator seeded by its position in that sequence. So a resumed run
reads exactly the images an uninterrupted run would, and a folder with fewer images than a batch works.
An unreadable file is replaced by the next readable image, reported once and counted in the log.

Each sample's mask comes from its mask noise, drawn by the loader from a generator seeded by the sample's
position too (``mae_fast.data.masks``). So what a sample gets (image, crop, flip, mask) depends on its
position alone, and N processes train on exactly the samples one process would.

A step is one optimizer step: ``batch_size`` x ``accum_iter`` images (``--steps``, the log, the
checkpoints and the lr schedule count these). Under torchrun (``WORLD_SIZE`` > 1) every process trains
``batch_size / world_size`` images of each micro-batch under DistributedDataParallel (eager steps: no CUDA
graph), and rank 0 alone writes and prints.

Output folder: ``checkpoint.pth`` (the latest: model, optimizer, scheduler, step, RNG states, the config,
the number of processes; ``model`` has the official MAE's keys), ``recon_<step>.png`` (original / masked /
reconstruction / reconstruction with the visible patches pasted back, for a few fixed images and a fixed
mask) and ``log.jsonl`` (one JSON line per logged step). A folder that holds a checkpoint is only
continued (``resume``), never started over.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from ..data import (CACHE_MAX_IMAGES, LOADERS, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                    Batches, ImageFolder, StreamSampler, center_box, default_workers, find_images, load_rgb,
                    random_resized_crop_box, resolve_loader, sample_images, to_pixels, to_tensor)
from . import checks, defaults
from . import distributed as dist
from .checkpoint import check_resume, load_checkpoint, read_checkpoint, save_checkpoint
from .reconstructions import save_reconstructions
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
    batch_size: Optional[int] = None  # images per micro-batch over all processes (the global batch)
    accum_iter: int = 1  # micro-batches per optimizer step: a step trains batch_size x accum_iter images
    steps: Optional[int] = None
    epochs: Optional[float] = None  # instead of steps: passes over the images
    warmup_steps: Optional[int] = None  # None: 5 % of the steps (the official 40 of 800 epochs)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    blr: float = 1.5e-4
    lr: Optional[float] = None  # None: blr * batch_size * accum_iter / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    grad_clip: Optional[float] = None  # the official pretraining does not clip
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    workers: Optional[int] = None  # None: min(8, cores per process // 2 - 1)
    loader: str = "auto"  # "gpu" (nvJPEG + one kernel) on CUDA, "cpu" (Pillow in the workers) elsewhere
    seed: int = 0
    log_every: int = 10
    save_every: Optional[int] = None  # steps between checkpoints (0: only at the end)
    recon_every: Optional[int] = None  # steps between reconstruction pictures (0: only at the end)
    recon_images: int = 4
    resume: Optional[str] = None  # a checkpoint to continue from

    def resolved_device(self) -> torch.device:
        """--device for this process (under torchrun, CUDA is the GPU of the process's LOCAL_RANK)."""
        return dist.process_device(checks.device(self.device))

    def images_per_step(self) -> int:
        """Images of one optimizer step, over all processes: batch_size x accum_iter (resolved configs)."""
        return self.batch_size * self.accum_iter

    def resolve(self, num_images: int) -> "PretrainConfig":
        """A copy with every default filled in (device-dependent sizes, steps from epochs, lr, warm-up); ValueError
        naming the flag when the sizes make no model that keeps a patch, or when the batch does not split
        over the processes."""
        kind = "cuda" if self.resolved_device().type == "cuda" else "cpu"
        table = defaults.PRETRAIN[kind]
        out = PretrainConfig(**asdict(self))
        out.device = str(self.resolved_device())
        out.model = out.model or table["model"]
        out.batch_size = out.batch_size or table["batch_size"]
        check_batch(out.batch_size, dist.world_size())
        for key in ("save_every", "recon_every"):
            if getattr(out, key) is None:
                setattr(out, key, table[key])
        if out.img_size is None:
            from ..configs import config

            out.img_size = int(config(out.model).get("img_size", 224))
        if out.steps is None:
            out.steps = (max(1, math.ceil(out.epochs * num_images / out.images_per_step())) if out.epochs is not None
                         else table["steps"])
        out.epochs = None
        if out.warmup_steps is None:
            out.warmup_steps = out.steps // 20
        if out.lr is None:
            out.lr = out.blr * out.images_per_step() / 256
        if out.dtype == "auto":
            out.dtype = "bf16" if kind == "cuda" else "fp32"
        if out.workers is None:
            out.workers = default_workers(dist.local_world_size())
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


def build(cfg: PretrainConfig, cuda_graph: bool = True):
    """(model, optimizer, scheduler) of a resolved config, on its device. On CUDA the optimizer is fused AdamW,
    capturable for the graph (``cuda_graph``; eager DDP steps take the plain fused one)."""
    from .. import models

    device = torch.device(cfg.device)
    model = models.create_model(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss).to(device)
    graph = dict(fused=True, capturable=cuda_graph) if device.type == "cuda" else {}
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg) / cfg.lr)
    return model, opt, sched


# ------------------------------------------------------------------------------------------- the run
def check_batch(batch_size: int, world: int) -> None:
    """ValueError naming --batch-size when the global batch does not split evenly over ``world`` processes."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch (images per micro-batch over all "
                         f"processes) and does not split evenly over the {world} processes of this run "
                         f"(WORLD_SIZE={world}): give a multiple of {world}")


def check_config(cfg: PretrainConfig) -> None:
    """ValueError naming the flag for settings that cannot run (before anything is loaded; the sizes, which
    need the model's defaults, are checked by :meth:`PretrainConfig.resolve`). The same on every process."""
    checks.model(cfg.model)
    if isinstance(cfg.accum_iter, bool) or not isinstance(cfg.accum_iter, int) or cfg.accum_iter < 1:
        raise ValueError(f"--accum-iter must be an integer >= 1, got {cfg.accum_iter!r}")
    if cfg.batch_size is not None:
        check_batch(cfg.batch_size, dist.world_size())
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
    dev = cfg.resolved_device()
    if cfg.loader not in LOADERS:
        raise ValueError(f"--loader {cfg.loader!r}: choose one of {', '.join(LOADERS)}")
    if cfg.loader == "gpu" and dev.type != "cuda":
        where = "the CPU" if dist.world_size() <= 1 else f"CPU processes ({dist.world_size()}, gloo)"
        raise ValueError(f"--loader gpu decodes on a CUDA device, and this run is on {where} (use --loader cpu or "
                         "auto)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _digest(paths, root: Optional[str]) -> str:
    """A short digest of the image files' names (relative to the folder): what every process must agree on."""
    names = [os.path.relpath(str(p), root) if root else Path(p).name for p in paths]
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def _every_process(e: Exception) -> Exception:
    """Mark an error that every process of a torchrun run raises at the same point (``every_process``): the
    command then lets all of them end together and rank 0 alone print it."""
    e.every_process = True
    return e


def _agree(error: str, facts: Optional[tuple], distributed: bool) -> None:
    """Under torchrun, after the set-up: every process's error and facts (number of images, digest of their
    names, step to start at) are gathered (one collective), and every process raises the same ValueError
    when one failed or they differ, so that all stop together with one message."""
    if not distributed:
        return
    got = dist.gather_objects((error, facts))
    failed = [(r, e) for r, (e, _) in enumerate(got) if e]
    if failed:
        r, e = failed[0]
        if len(failed) == len(got) and all(x == e for _, x in failed):
            raise _every_process(ValueError(e))
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise _every_process(ValueError(f"{e} (on rank {r}{more})"))
    differ = next((r for r, (_, f) in enumerate(got) if f != got[0][1]), None)
    if differ is not None:
        def seen(f):
            return f"{f[0]} images (names digest {f[1]}), starting at step {f[2]}"

        raise _every_process(ValueError(
            f"the processes do not see the same run: rank 0 sees {seen(got[0][1])}, rank {differ} "
            f"{seen(got[differ][1])}; on several nodes the images and the checkpoint must be the same files at the "
            "same paths on every node (a shared filesystem)"))


def _resume(cfg: PretrainConfig, out: Path, model, opt, sched) -> tuple:
    """(the step to start at, the number of processes of the run continued; 0 for a new run)."""
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / CHECKPOINT)
    if not resume and (out / CHECKPOINT).exists():
        raise ValueError(f"{out / CHECKPOINT} exists: --resume continues that run; to start a new one, give another "
                         "--output-dir (or remove the old run)")
    if not resume:
        return 0, 0
    if not os.path.isfile(resume):
        raise ValueError(f"--resume: no checkpoint at {resume}")
    state = read_checkpoint(resume)
    check_resume(state, cfg, resume)
    start = load_checkpoint(resume, model, opt, sched, state=state)
    if start >= cfg.steps:
        raise ValueError(f"--resume: {resume} is at step {start}, already at --steps {cfg.steps}; give more "
                         "--steps to train on")
    return start, int(state.get("world_size", 1))


def _next_step(batches: Batches, accum_iter: int) -> tuple:
    """(imgs, noise) of one step: ``accum_iter`` micro-batches side by side (TrainStep splits them again)."""
    if accum_iter == 1:
        return next(batches)
    parts = [next(batches) for _ in range(accum_iter)]
    return torch.cat([x for x, _ in parts]), torch.cat([z for _, z in parts])


def _gather_interval(loss_sum: torch.Tensor, wait_s: float, new_skips: list) -> tuple:
    """(every process's loss sum, every process's data wait, every process's newly skipped files) over one log
    interval: one all_gather of three numbers per process (one host sync, as one process's read of its loss),
    and a second gather of the file names only when some process skipped files."""
    local = torch.stack([loss_sum.double(), torch.tensor(wait_s, dtype=torch.float64, device=loss_sum.device),
                         torch.tensor(float(len(new_skips)), dtype=torch.float64, device=loss_sum.device)])
    rows = dist.gather_rows(local).tolist()  # [world, 3]
    skips = dist.gather_objects(new_skips) if sum(r[2] for r in rows) else []
    return [r[0] for r in rows], [r[1] for r in rows], [x for part in skips for x in part]


def run(cfg: PretrainConfig, progress: bool = True, say=print) -> dict:
    """Train; returns a summary (steps, final loss, paths). ``say`` prints the start and end lines.

    Under torchrun (WORLD_SIZE > 1) every process calls this. It starts the process group (NCCL on CUDA,
    gloo on CPU) unless one runs, and leaves it running: the caller ends it (``distributed.finish()``, as the
    command does). Rank 0 alone writes files and prints. The errors of the set-up (flags, files, checkpoint)
    and a non-finite loss are raised by every process alike, marked ``every_process``; only a bad --device
    is raised before the process group starts. The summary's ``data_wait_s`` is this process's."""
    from torch.nn.parallel import DistributedDataParallel

    from ..train import TrainLoss, TrainStep

    device = cfg.resolved_device()
    distributed = dist.setup(device)
    world = dist.world_size() if distributed else 1
    rank = dist.rank()
    main = rank == 0
    out = Path(cfg.output_dir)

    error, facts = "", None
    try:
        check_config(cfg)
        paths = sample_images() if cfg.images is None else find_images(cfg.images)
        cfg = cfg.resolve(len(paths))
        if main:
            out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model, opt, sched = build(cfg, cuda_graph=not distributed)
        start, was_world = _resume(cfg, out, model, opt, sched)
        fixed = ImageFolder(paths, cfg.img_size, cfg.seed).fixed(cfg.recon_images).to(device) if main else None
        facts = (len(paths), _digest(paths, cfg.images), start)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if not distributed:
            raise
        error = str(e)
    _agree(error, facts, distributed)

    net = model
    if distributed:  # forward_train under DDP; the MAE's buffers are fixed tables: no broadcast at each forward
        quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                 inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        net = DistributedDataParallel(TrainLoss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                      **quiet)
    step_fn = TrainStep(net, opt, cfg.mask_ratio, amp=None if cfg.dtype == "fp32" else cfg.dtype,
                        grad_clip=cfg.grad_clip, scheduler=sched, cuda_graph=not distributed,
                        accum_iter=cfg.accum_iter)

    def skipped(path: str, why: str) -> None:
        with tqdm.external_write_mode():
            say(f"pretrain{f' (rank {rank})' if distributed else ''}: skipped an unreadable file, the next readable "
                f"image takes its samples: {why}")

    K = cfg.accum_iter
    batches = Batches(paths, cfg.img_size, cfg.batch_size, seed=cfg.seed, start_step=start * K, workers=cfg.workers,
                      device=device, loader=cfg.loader, on_skip=skipped, rank=rank, world_size=world,
                      mask_noise=model.patch_embed.num_patches // model.mask_frames)

    if main:
        source = "the sample photographs" if cfg.images is None else cfg.images
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        threads = f", {_plural(torch.get_num_threads(), 'thread')}" if device.type == "cpu" else ""
        split = ""
        if world > 1 or K > 1:
            split = (f" ({world} processes x {cfg.batch_size // world}" if world > 1 else f" ({cfg.batch_size}") + \
                (f" x {K} micro-batches)" if K > 1 else ")")
        where = f"{device}{threads}"
        if distributed:
            where = (f"{world} processes ({device.type}{threads} each; DDP over {dist.backend()}, eager steps: "
                     "TrainStep does not capture DDP)")
        resumed = ""
        if start:
            resumed = f"; resumed at step {start}"
            if was_world != world:
                resumed += (f" of a run on {was_world} process{'es' if was_world > 1 else ''} (the same images, "
                            "crops, masks and schedule; the numbers follow the uninterrupted run up to fp32 "
                            "reduction order, not bit for bit)")
        say(f"pretrain {cfg.model} ({n_params / 1e6:.1f}M parameters) at {cfg.img_size}px on {len(paths)} images "
            f"from {source}: {cfg.steps} steps of {cfg.images_per_step()}{split} "
            f"({cfg.steps * cfg.images_per_step() / len(paths):.1f} epochs), mask ratio {cfg.mask_ratio:g}, lr "
            f"{cfg.lr:.3g} (warm-up {_plural(cfg.warmup_steps, 'step')}, cosine to {cfg.min_lr:g}), {cfg.dtype} on "
            f"{where}, {cfg.loader} loader with {_plural(cfg.workers, 'worker')}{' per process' if distributed else ''}"
            + resumed)

    log = open(out / "log.jsonl", "a") if main else None
    ckpt, recon = out / CHECKPOINT, None
    loss_sum = torch.zeros((), device=device)
    last_loss, count = float("nan"), 0
    t_run = t_log = time.perf_counter()
    wait_log, sent = 0.0, 0
    skipped_files: dict = {}  # every process's unreadable files, gathered at each log line
    saved_at = recon_at = -1
    try:
        with progress_bar(cfg.steps, "pretrain", enabled=progress and main, initial=start) as bar:
            for step in range(start, cfg.steps):
                imgs, noise = _next_step(batches, K)
                loss_sum += step_fn(imgs, noise)
                count += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    new_skips = list(batches.skips.files.items())[sent:]
                    sent += len(new_skips)
                    sums, waits, skips = _gather_interval(loss_sum, batches.wait_s - wait_log, new_skips)
                    skipped_files.update(skips)
                    last_loss = sum(sums) / len(sums) / count  # the mean over every sample of the interval
                    waits = [w / count for w in waits]
                    now = time.perf_counter()
                    ips = count * cfg.images_per_step() / (now - t_log)
                    if not math.isfinite(last_loss):  # the gathered loss: every process raises here
                        raise _every_process(FloatingPointError(f"the loss is {last_loss} at step {done}; lower "
                                                                "--lr or --blr"))
                    lr = lr_at(step, cfg)
                    bar.set_postfix_str(f"loss {last_loss:.4f}, lr {lr:.2e}, {ips:.0f} img/s", refresh=False)
                    if main:
                        log.write(json.dumps({
                            "step": done, "loss": last_loss, "lr": lr, "images_per_s": ips, "elapsed_s": now - t_run,
                            "data_wait_s": max(waits), "data_wait_s_per_rank": waits,
                            "skipped_files": len(skipped_files), "world_size": world, "accum_iter": K}) + "\n")
                        log.flush()
                    loss_sum.zero_()
                    count, t_log, wait_log = 0, time.perf_counter(), batches.wait_s
                if main and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    save_checkpoint(ckpt, model, opt, sched, done, cfg)
                    saved_at = done
                if main and cfg.recon_every and done % cfg.recon_every == 0 and done < cfg.steps:
                    recon = out / f"recon_{done:06d}.png"
                    save_reconstructions(recon, model, fixed, cfg.mask_ratio, done)
                    recon_at = done
                bar.update(1)
        if main and saved_at != cfg.steps:
            save_checkpoint(ckpt, model, opt, sched, cfg.steps, cfg)
        if main and recon_at != cfg.steps:
            recon = out / f"recon_{cfg.steps:06d}.png"
            save_reconstructions(recon, model, fixed, cfg.mask_ratio, cfg.steps)
    finally:
        if log is not None:
            log.close()
        batches.close()
    elapsed = time.perf_counter() - t_run
    skips = f" ({_plural(len(skipped_files), 'unreadable file')} skipped)" if skipped_files else ""
    if main:
        say(f"trained steps {start + 1}-{cfg.steps} in {_duration(elapsed)}, final loss {last_loss:.4f}{skips}: "
            f"checkpoint {ckpt}, reconstructions {recon}, log {out / 'log.jsonl'}")
    return {"config": asdict(cfg), "start_step": start, "steps": cfg.steps, "final_loss": last_loss,
            "checkpoint": str(ckpt), "reconstruction": str(recon), "log": str(out / "log.jsonl"),
            "seconds": elapsed, "skipped_files": skipped_files, "data_wait_s": batches.wait_s,
            "world_size": world, "rank": rank}


def config_from_args(args) -> PretrainConfig:
    """A PretrainConfig from parsed `mae-fast pretrain` arguments (same names)."""
    kwargs = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if hasattr(args, f.name)}
    return PretrainConfig(**kwargs)

