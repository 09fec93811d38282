"""Training-step throughput: forward, backward and an AdamW step, side by side and interleaved.

Used by `mae-fast bench` and `mae-fast sweep`. The variants (reference and mae_fast, eager, torch.compile,
and mae_fast's whole step as one CUDA graph) and how each is built: :mod:`mae_fast.tools.variants`.

How it measures: every variant is built and warmed up first (compilation happens there), then the
timed steps run in rounds, one step of each variant per round, so slow drifts of the machine (clocks,
temperature, other load) hit every variant alike. One shared pool of random images (three batches,
rotated; never zeros). CUDA events bracket each step on a GPU, perf_counter on a CPU; median with
p20/p80 over the timed steps. bf16 autocast on a GPU, fp32 on a CPU unless ``dtype`` says otherwise.

Peak memory (CUDA) is each variant's own: the allocator's peak during its steps minus what the other
variants keep resident (their weights and optimizer state), i.e. what the step would need with this
variant alone in the process (the image pool included).

Mask ratio 0 (no masking): the official loss averages over removed patches and divides by zero there.
Here the loss at ratio 0 is defined as the mean over all patches (reconstruction of every, visible,
patch); the reference variants switch to it (``AllPatchLoss``) so the unmasked baseline of a sweep is a
real training step. The fast model must do the same (or fail loudly; its result is then an error).

Under ``torchrun --nproc_per_node=N`` every process runs the same variants under
DistributedDataParallel (nccl on CUDA, gloo on CPU), batch = per-device batch; the results hold
per-device and total images/s.

Video (``num_frames`` T > 1, ``t_patch_size`` u, ``tube_masking``): every variant is built with these
factory arguments, the inputs are random clips [N, C, T, H, W], and one sample is a clip: ``images_per_s``
and ``flops_per_image`` are then clips/s and FLOPs per clip (the JSON keys stay, the table says clips).
Without ``batch_size`` the default batch is the image default divided by T/u (the same tokens per batch).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from .. import timing
from . import ceilings, checks, defaults, flops, report
from . import distributed as dist
from .progress import bar as progress_bar
from .runner import Runner, images
from .variants import resolve_variants

CPU_DEFAULT = defaults.BENCH["cpu"]
GPU_DEFAULT = defaults.BENCH["cuda"]
@dataclass
class BenchConfig:
    model: str
    batch_size: int
    steps: int
    warmup: int
    mask_ratio: float = 0.75
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    norm_pix_loss: bool = True
    seed: int = 0
    # None: the default set (reference, mae_fast when it imports; +compile ones when ``compile``)
    variants: Optional[List[str]] = None
    compile: Optional[bool] = None  # None: on a GPU yes, on a CPU no (compiling on a CPU is slow)
    peak_tflops: Optional[float] = None  # None: measured in the run (ceilings.matmul_peak)
    # video: clips of num_frames frames, tubelets of t_patch_size frames (1, 1: the image model)
    num_frames: int = 1
    t_patch_size: int = 1
    tube_masking: bool = False  # one spatial mask per clip, repeated over the T/u slots

    def video_kwargs(self) -> dict:
        """The factory arguments of the video model ({} for an image model)."""
        return flops.video_kwargs(self.num_frames, self.t_patch_size, self.tube_masking)

    def dims(self) -> flops.MAEDims:
        """The model's sizes (from the reference config; ValueError for a bad combination)."""
        return flops.dims_of_config(self.model, self.img_size, self.patch_size, **self.video_kwargs())

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.device)
        if dev.type == "cuda" and dev.index is None and dist.world_size() > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dev

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.resolved_device().type == "cuda" else "fp32"

    def resolved_compile(self) -> bool:
        return self.resolved_device().type == "cuda" if self.compile is None else bool(self.compile)


def check_video(num_frames: int, t_patch_size: int, tube_masking: bool) -> None:
    """ValueError naming the flag when the video settings do not make a model."""
    for flag, v in (("--num-frames", num_frames), ("--t-patch-size", t_patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {v!r}")
    if num_frames % t_patch_size:
        raise ValueError(f"--num-frames {num_frames} is not a multiple of --t-patch-size {t_patch_size}")
    if tube_masking and num_frames == 1:
        raise ValueError("--tube (tube masking) needs a video model: give --num-frames > 1")


def video_batch(default_batch: int, num_frames: Optional[int], t_patch_size: Optional[int]) -> int:
    """The default batch of a video run: the image default divided by T/u slots (the same tokens per batch)."""
    slots = max(1, int(num_frames or 1) // max(1, int(t_patch_size or 1)))
    return max(1, default_batch // slots)


def default_config(device: Optional[str] = None, **overrides) -> BenchConfig:
    """The embedded default: ViT-B/16 at batch 256 on a GPU, a tiny model on a CPU (for video, the batch
    divided by T/u unless given). ValueError for a --device that is none."""
    dev = device or "auto"
    is_cuda = checks.device(dev).type == "cuda"
    base = dict(GPU_DEFAULT if is_cuda else CPU_DEFAULT)
    extra = {}
    for k, v in overrides.items():
        if v is None:
            continue
        (base if k in base else extra)[k] = v
    if overrides.get("batch_size") is None:
        base["batch_size"] = video_batch(base["batch_size"], extra.get("num_frames"), extra.get("t_patch_size"))
    return BenchConfig(device=dev, **base, **extra)


def cpu_load() -> Optional[float]:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure_peak(cfg: BenchConfig, device: torch.device) -> tuple:
    """(peak FLOP/s, how it was obtained): ``cfg.peak_tflops`` if given, else a GEMM measured now."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12, "given (--peak-tflops)"
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.resolved_dtype()]
    if device.type == "cpu":
        dt = torch.float32 if dt == torch.float16 else dt
    n = 8192 if device.type == "cuda" else 1024
    return ceilings.matmul_peak(device, dt, n=n), f"measured: {n}x{n} {str(dt).replace('torch.', '')} matmul (p20)"


def check_config(cfg: BenchConfig) -> None:
    """ValueError naming the flag for settings `bench` (and `profile`) cannot run, before anything is built.
    Mask ratio 0 is a valid point here (the unmasked step, loss over every patch)."""
    checks.model(cfg.model)
    checks.device_and_dtype(cfg.device, cfg.resolved_dtype())
    check_video(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking)
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    checks.sizes(cfg.model, cfg.img_size, cfg.patch_size, cfg.mask_ratio, **cfg.video_kwargs())
    if cfg.variants and cfg.compile is not None:
        raise ValueError("give either --variants or --compile/--no-compile, not both")


# --------------------------------------------------------------------------- the run
def run(cfg: BenchConfig, argv: Optional[List[str]] = None, progress: bool = True,
        peak: Optional[tuple] = None) -> dict:
    """Run the variants of ``cfg`` interleaved and return the results document (provenance + results).

    ``peak``: (FLOP/s, source) to reuse instead of measuring (the sweep measures once).
    ``progress``: a progress bar on stderr.
    """
    check_video(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking)
    device = cfg.resolved_device()
    distributed = dist.world_size() > 1
    names, skipped = resolve_variants(cfg, distributed)
    distributed = dist.setup(device)
    rank = dist.rank()
    world = dist.world_size() if distributed else 1
    cuda = device.type == "cuda"
    load = cpu_load() if device.type == "cpu" else None  # before this run adds its own
    bar = progress_bar(len(names) * cfg.warmup + cfg.steps, "bench", enabled=progress and rank == 0)

    if any(n.endswith("+compile") for n in names):
        # fresh compile caches: new model instances would otherwise count as recompiles of the same code,
        # and past dynamo's recompile limit a "+compile" variant would quietly run eager
        torch._dynamo.reset()
    dims = cfg.dims()
    imgs_pool = images(cfg, dims, device, rank)
    pool_bytes = sum(x.numel() * x.element_size() for x in imgs_pool)
    runners: List[Runner] = []
    for name in names:
        before = torch.cuda.memory_allocated(device) if cuda else 0
        bar.set_description(f"bench, {name} build and warm-up")
        r = Runner(name, cfg, device, imgs_pool, distributed)
        r.warm_up(cfg.warmup, bar)
        if cuda:
            torch.cuda.synchronize(device)
            r.resident_bytes = torch.cuda.memory_allocated(device) - before
            r.allocated_before = before
        runners.append(r)
    if peak is None:
        bar.set_description("bench, measuring the matmul peak")
        peak = measure_peak(cfg, device)
    peak_flops, peak_source = peak

    bar.set_description("bench, timed steps (interleaved)")
    for i in range(cfg.steps):  # interleaved rounds: one step of each variant
        for r in runners:
            r.timed_step()
        if cuda and (i + 1) % 8 == 0:  # read the events now and then (a bounded number pending)
            for r in runners:
                r.timer.collect()
        bar.update(1)
    bar.close()

    results = []
    for r in runners:
        q = timing.quantiles(r.times)
        loss_value = float(r.last_loss.detach().float().item())
        if not torch.isfinite(torch.tensor(loss_value)):
            raise RuntimeError(f"{r.name}: the loss is not finite ({loss_value}); the benchmark is meaningless")
        ips = cfg.batch_size / (q["median_ms"] * 1e-3)  # this device
        others = sum(o.resident_bytes for o in runners if o is not r)
        peak_mem = (r.peak_bytes - others) if cuda else None
        if r.capture_peak_bytes:  # the graph's activations live in its private pool, allocated at capture
            peak_mem = max(peak_mem, r.capture_peak_bytes - r.allocated_before + pool_bytes)
        fpi = flops.train_flops(r.dims, cfg.mask_ratio, **r.flops_opts)
        extra = {}
        if r.train_step is not None:
            extra = {"cuda_graph": r.graphed, "graph_captures": r.train_step.captures}
        results.append({
            "variant": r.name,
            "images_per_s": ips,
            "step_ms_median": q["median_ms"],
            "step_ms_p20": q["p20_ms"],
            "step_ms_p80": q["p80_ms"],
            "peak_mem_bytes": peak_mem,
            "flops_per_image": fpi,
            "tflops_per_s": fpi * ips / 1e12,
            "mfu": fpi * ips / peak_flops,
            "final_loss": loss_value,
            "steps": len(r.times),
            "flops_counting": r.flops_opts,
            **extra,
        })
    if distributed:
        per_rank: List[Optional[list]] = [None] * world
        dist.all_gather_object(per_rank, [x["images_per_s"] for x in results])
        for j, x in enumerate(results):
            x["images_per_s_per_device"] = [rr[j] for rr in per_rank]
            x["images_per_s"] = sum(x["images_per_s_per_device"])  # total over devices
            x["mfu"] = x["flops_per_image"] * x["images_per_s"] / world / peak_flops
            x["tflops_per_s"] = x["flops_per_image"] * x["images_per_s"] / world / 1e12  # per device
    ref = next((x for x in results if x["variant"] == "reference"), None)
    for x in results:
        x["speedup_vs_reference"] = (x["images_per_s"] / ref["images_per_s"]) if ref else None

    doc = report.provenance(argv, device)
    doc["config"] = dict(asdict(cfg), device=str(device), dtype=cfg.resolved_dtype(), variants=names,
                         compile=cfg.resolved_compile(), world_size=world,
                         img_size=cfg.img_size or dims.img_h, patch_size=cfg.patch_size or dims.patch_size,
                         video=dims.video, input_shape=list(dims.input_shape(cfg.batch_size)),
                         num_patches=dims.num_patches)
    if device.type == "cpu":
        doc["config"]["threads"] = torch.get_num_threads()
        doc["config"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        doc["load_average_1min"] = load
    doc["peak_flops_per_s"] = peak_flops
    doc["peak_source"] = peak_source
    doc["notes"] = {
        "timing": "steps of all variants interleaved round by round after per-variant warm-up; median, p20, p80",
        "flops": "analytic matmul FLOPs per image (mae_fast.tools.flops), training = 3x forward",
        "mfu": "flops_per_image * images_per_s (per device) / peak_flops_per_s",
        "peak_mem": "CUDA only (null on CPU): per variant, the allocator peak during its steps minus the other "
                    "variants' resident memory; mae_fast+graph: the larger of that and its peak while the step was captured (a "
                    "replay allocates nothing: the activations stay in the graph's private memory pool)",
        "compile": "torch.compile(model) in the default mode; the optimizer step is not compiled",
        "graph": "mae_fast+graph: mae_fast.TrainStep; on CUDA with AdamW(fused=True, capturable=True) and the "
                 "whole step one CUDA graph replay, every timed step a replay (the other variants: AdamW's default "
                 "step); on a CPU the same call eagerly, with the other variants' AdamW",
        "mask_ratio_0": "loss over all patches (the reference's masked mean is 0/0 there)",
        "images_per_s": "total over all devices under DDP (per-device values in images_per_s_per_device)",
    }
    if dims.video:
        doc["notes"]["video"] = ("one sample is a clip (config.input_shape is the batch [N, C, T, H, W]): "
                                 "images_per_s and flops_per_image are per clip")
    if skipped:
        doc["skipped_variants"] = skipped
    doc["results"] = results
    if any(n.startswith("mae_fast") for n in names):
        from ..nn import fused_choices

        doc["fused_choices"] = fused_choices()  # what each fused op measured against its stock counterpart here
    return doc


