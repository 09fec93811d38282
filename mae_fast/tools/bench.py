"""Training-step throughput: forward, backward and an AdamW step, side by side and interleaved.

Used by `mae-fast bench` and `mae-fast sweep`. Variants (``VARIANTS``, name -> builder(cfg, device)):

  reference           mae_fast.reference, eager
  reference+compile   torch.compile(reference model), default mode (the model only, not the optimizer)
  mae_fast            mae_fast.models.create_model (the fast model), eager, trained through its
                      ``forward_train`` (loss only, its own fast path) when it has one
  mae_fast+compile    torch.compile of the same, default mode
  mae_fast+graph      the fast model trained by mae_fast.TrainStep: AdamW(fused=True, capturable=True) and the
                      whole step (forward, backward, optimizer) one CUDA graph replay. On a CPU the same
                      TrainStep call runs eagerly with the other variants' AdamW (the table says so).
                      Not under DDP, not with fp16 (TrainStep has no loss scaling).

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

import contextlib
import importlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import reference
from .. import timing
from . import ceilings, defaults, flops, report
from .progress import bar as progress_bar

CPU_DEFAULT = defaults.BENCH["cpu"]
GPU_DEFAULT = defaults.BENCH["cuda"]
ALL_VARIANTS = ["reference", "reference+compile", "mae_fast", "mae_fast+compile", "mae_fast+graph"]
GRAPH = "mae_fast+graph"


class VariantUnavailable(RuntimeError):
    """A variant was asked for that cannot be built here (e.g. mae_fast.models does not import)."""


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
        if dev.type == "cuda" and dev.index is None and _world_size() > 1:
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
    divided by T/u unless given)."""
    dev = device or "auto"
    is_cuda = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else torch.device(dev)).type == "cuda"
    base = dict(GPU_DEFAULT if is_cuda else CPU_DEFAULT)
    extra = {}
    for k, v in overrides.items():
        if v is None:
            continue
        (base if k in base else extra)[k] = v
    if overrides.get("batch_size") is None:
        base["batch_size"] = video_batch(base["batch_size"], extra.get("num_frames"), extra.get("t_patch_size"))
    return BenchConfig(device=dev, **base, **extra)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


# --------------------------------------------------------------------------- variants
class AllPatchLoss(nn.Module):
    """The reference with the ratio-0 loss defined: at mask_ratio 0 the loss is the mean over all patches.

    For mask_ratio > 0 it is the reference's forward, unchanged.
    """

    def __init__(self, model: reference.MaskedAutoencoderViT):
        super().__init__()
        self.model = model

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        m = self.model
        if mask_ratio > 0:
            return m(imgs, mask_ratio, noise)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.0, noise)  # [N, 1+L, D], mask all 0
        pred = m.forward_decoder(latent, ids_restore)  # [N, L, (u*)p*p*C]
        loss = m.forward_loss(imgs, pred, torch.ones_like(mask))  # every patch counts
        return loss, pred, mask


def _model_kwargs(cfg: BenchConfig) -> dict:
    kwargs = {"norm_pix_loss": cfg.norm_pix_loss, **cfg.video_kwargs()}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    return kwargs


def _create(factory, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """factory(name, **kwargs) on ``device``: built there directly on a GPU (initialising ViT-L on the host
    takes seconds, and a sweep builds dozens of models), on the host otherwise."""
    ctx = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        model = factory(cfg.model, **_model_kwargs(cfg))
    return model.to(device)


def build_reference(cfg: BenchConfig, device: torch.device) -> nn.Module:
    model = _create(reference.create_model, cfg, device)
    return AllPatchLoss(model) if cfg.mask_ratio == 0 else model


def build_reference_compiled(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return torch.compile(build_reference(cfg, device))


def fast_models_module():
    """mae_fast.models, or VariantUnavailable saying why it cannot be used."""
    try:
        mod = importlib.import_module("mae_fast.models")
    except ImportError as e:
        raise VariantUnavailable(
            f"the mae_fast variants need mae_fast.models (create_model), which does not import here: {e}"
        ) from e
    if not hasattr(mod, "create_model"):
        raise VariantUnavailable("the mae_fast variants need mae_fast.models.create_model, which is missing")
    return mod


def fast_available() -> bool:
    try:
        fast_models_module()
        return True
    except VariantUnavailable:
        return False


class TrainLoss(nn.Module):
    """The fast model's training path: ``forward_train`` (the loss only; the model chooses its fast path,
    e.g. the decoder head on removed tokens only) when it has one, else its ``forward``. A module, so that
    torch.compile and DDP see that path through ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.uses_forward_train = callable(getattr(model, "forward_train", None))

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        if self.uses_forward_train:
            return self.model.forward_train(imgs, mask_ratio)
        return self.model(imgs, mask_ratio)[0]


def build_mae_fast(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return TrainLoss(_create(fast_models_module().create_model, cfg, device))


def build_mae_fast_compiled(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return torch.compile(build_mae_fast(cfg, device))


VARIANTS: Dict[str, Callable[[BenchConfig, torch.device], nn.Module]] = {
    "reference": build_reference,
    "reference+compile": build_reference_compiled,
    "mae_fast": build_mae_fast,
    "mae_fast+compile": build_mae_fast_compiled,
    GRAPH: build_mae_fast,  # the same model; the step is mae_fast.TrainStep (see _Runner)
}


def graph_unavailable(cfg: BenchConfig, distributed: bool = False) -> Optional[str]:
    """Why the mae_fast+graph variant cannot run with these settings (None: it can)."""
    if cfg.resolved_dtype() == "fp16":
        return "mae_fast+graph: TrainStep does not do fp16 loss scaling (use --dtype bf16 or fp32)"
    if distributed:
        return "mae_fast+graph: TrainStep does not capture DDP steps (its gradient all-reduce)"
    return None


def resolve_variants(cfg: BenchConfig, distributed: bool = False) -> tuple:
    """(variants to run, {skipped variant: why}). Explicitly asked-for variants are never skipped."""
    if cfg.variants:
        unknown = [v for v in cfg.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; available: {sorted(VARIANTS)}")
        if any(v.startswith("mae_fast") for v in cfg.variants) and VARIANTS["mae_fast"] is build_mae_fast:
            fast_models_module()  # asked for: a clear VariantUnavailable now, before any timing
        if GRAPH in cfg.variants and graph_unavailable(cfg, distributed):
            raise VariantUnavailable(graph_unavailable(cfg, distributed))
        return list(dict.fromkeys(cfg.variants)), {}
    names = ["reference", "mae_fast"]
    if cfg.resolved_compile():
        names = ["reference", "reference+compile", "mae_fast", "mae_fast+compile"]
    skipped = {}
    if cfg.resolved_device().type == "cuda":  # the graph variant by default where there are CUDA graphs
        why = graph_unavailable(cfg, distributed)
        if why:
            skipped[GRAPH] = why
        else:
            names.append(GRAPH)
    try:
        fast_models_module()
    except VariantUnavailable as e:
        why = str(e)
        for v in [n for n in names if n.startswith("mae_fast")]:
            skipped[v] = why
        names = [n for n in names if not n.startswith("mae_fast")]
    return names, skipped


def flops_options(name: str, model: nn.Module) -> dict:
    """How to count a variant's FLOPs: the reference embeds all patches and predicts all rows; the fast
    model may say what it does through attributes of the same names; by default: visible-only embedding
    (ARCHITECTURE.md) and a head on removed tokens only when it trains through ``forward_train``."""
    if name.startswith("reference"):
        return {"embed_visible_only": False, "pred_masked_only": False}
    wrapper = getattr(model, "_orig_mod", model)
    inner = getattr(wrapper, "model", wrapper)
    head_default = bool(getattr(wrapper, "uses_forward_train", False))  # forward_train: head on removed tokens
    return {
        "embed_visible_only": bool(getattr(inner, "embed_visible_only", True)),
        "pred_masked_only": bool(getattr(inner, "pred_masked_only", head_default)),
    }


# --------------------------------------------------------------------------- distributed
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dist_setup(device: torch.device) -> bool:
    """Start the process group under torchrun; True when running distributed."""
    if _world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def finish_distributed() -> None:
    """End the process group :func:`run` started: all ranks wait for each other (rank 0 writes the
    files first), then tear down together. A rank that leaves early can hang the others in gloo's
    teardown (seen with two CPU processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled = hasattr(model, "_orig_mod")
    inner = model._orig_mod if compiled else model
    ddp = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if compiled else ddp


# --------------------------------------------------------------------------- one variant's step
class _Runner:
    """A built variant: model, optimizer, one training step, its timings."""

    def __init__(self, name: str, cfg: BenchConfig, device: torch.device, imgs_pool, distributed: bool):
        self.name = name
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)  # same initial weights for every variant (and every rank)
        model = VARIANTS[name](cfg, device)
        model.train()
        self.dims = flops.dims_of(model)
        self.flops_opts = flops_options(name, model)
        self.dtype = cfg.resolved_dtype()
        self.train_step = None  # mae_fast.TrainStep for the +graph variant
        graph_opt = dict(fused=True, capturable=True) if name == GRAPH and device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **graph_opt)
        if name == GRAPH:
            from ..train import TrainStep

            self.train_step = TrainStep(model, self.opt, cfg.mask_ratio, amp=self.dtype, cuda_graph=True)
        self.model = _wrap_ddp(model, device) if distributed else model
        self.imgs_pool = imgs_pool
        self.i = 0
        self.timer = timing.StepTimer(device)
        self.peak_bytes = 0
        self.resident_bytes = 0
        self.allocated_before = 0  # what the process held before this variant was built (CUDA)
        self.capture_peak_bytes = 0  # +graph: the allocator peak while its step was captured
        self.last_loss: Optional[torch.Tensor] = None

    @property
    def graphed(self) -> bool:
        return self.train_step is not None and self.train_step.graphed

    def step(self) -> torch.Tensor:
        imgs = self.imgs_pool[self.i % len(self.imgs_pool)]
        self.i += 1
        if self.train_step is not None:
            return self.train_step(imgs)
        with _autocast(self.device, self.dtype):
            out = self.model(imgs, mask_ratio=self.cfg.mask_ratio)
        loss = out[0] if isinstance(out, (tuple, list)) else out  # reference: (loss, pred, mask); fast: loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def warm_up(self, n: int, bar=None) -> None:
        """``n`` untimed steps; the +graph variant steps on until its step is captured, so that every timed
        step is a replay (its capture peak is recorded: a replay allocates nothing new)."""
        i = 0
        while i < n or (self.graphed and not self.train_step.captured):
            capturing = self.graphed and not self.train_step.captured
            if capturing:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            i += 1
            if capturing and self.train_step.captured:
                self.capture_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            if bar is not None and i <= n:
                bar.update(1)

    def timed_step(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.timer:
            self.last_loss = self.step()
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    @property
    def times(self) -> List[float]:
        """Every timed step's milliseconds so far."""
        return self.timer.collect()


def cpu_load() -> Optional[float]:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _images(cfg: BenchConfig, dims: flops.MAEDims, device: torch.device, rank: int) -> List[torch.Tensor]:
    """Three random batches: images [N, C, H, W], or clips [N, C, T, H, W] for a video model."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + 17 + rank)
    # a few distinct random batches, rotated (never zeros; no single buffer that stays in cache)
    return [torch.randn(*dims.input_shape(cfg.batch_size), generator=g).to(device) for _ in range(3)]


def measure_peak(cfg: BenchConfig, device: torch.device) -> tuple:
    """(peak FLOP/s, how it was obtained): ``cfg.peak_tflops`` if given, else a GEMM measured now."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12, "given (--peak-tflops)"
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.resolved_dtype()]
    if device.type == "cpu":
        dt = torch.float32 if dt == torch.float16 else dt
    n = 8192 if device.type == "cuda" else 1024
    return ceilings.matmul_peak(device, dt, n=n), f"measured: {n}x{n} {str(dt).replace('torch.', '')} matmul (p20)"


# --------------------------------------------------------------------------- the run
def run(cfg: BenchConfig, argv: Optional[List[str]] = None, progress: bool = True,
        peak: Optional[tuple] = None) -> dict:
    """Run the variants of ``cfg`` interleaved and return the results document (provenance + results).

    ``peak``: (FLOP/s, source) to reuse instead of measuring (the sweep measures once).
    ``progress``: a progress bar on stderr.
    """
    check_video(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking)
    device = cfg.resolved_device()
    distributed = _world_size() > 1
    names, skipped = resolve_variants(cfg, distributed)
    distributed = _dist_setup(device)
    rank = _rank()
    world = _world_size() if distributed else 1
    cuda = device.type == "cuda"
    load = cpu_load() if device.type == "cpu" else None  # before this run adds its own
    bar = progress_bar(len(names) * cfg.warmup + cfg.steps, "bench", enabled=progress and rank == 0)

    if any(n.endswith("+compile") for n in names):
        # fresh compile caches: new model instances would otherwise count as recompiles of the same code,
        # and past dynamo's recompile limit a "+compile" variant would quietly run eager
        torch._dynamo.reset()
    dims = cfg.dims()
    imgs_pool = _images(cfg, dims, device, rank)
    pool_bytes = sum(x.numel() * x.element_size() for x in imgs_pool)
    runners: List[_Runner] = []
    for name in names:
        before = torch.cuda.memory_allocated(device) if cuda else 0
        bar.set_description(f"bench, {name} build and warm-up")
        r = _Runner(name, cfg, device, imgs_pool, distributed)
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
        import torch.distributed as dist

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
    return doc


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


TABLE_COLUMNS = ["variant", "images_per_s", "step_ms_median", "step_ms_p20", "step_ms_p80", "peak_mem_MiB",
                 "GFLOP_per_img", "TFLOP_per_s", "mfu", "speedup"]
VIDEO_COLUMNS = [{"images_per_s": "clips_per_s", "GFLOP_per_img": "GFLOP_per_clip"}.get(c, c) for c in TABLE_COLUMNS]


def is_video(config: dict) -> bool:
    """Whether a results document's config is a video run (older documents: image)."""
    return int(config.get("num_frames") or 1) > 1 or int(config.get("t_patch_size") or 1) > 1


def describe_input(config: dict) -> str:
    """'64px/p8' for images; '4 frames x 64px, tubelet 2x8x8, tube masking' for video."""
    p = config["patch_size"]
    if not is_video(config):
        return f"{config['img_size']}px/p{p}"
    return (f"{config['num_frames']} frames x {config['img_size']}px, tubelet {config['t_patch_size']}x{p}x{p}"
            + (", tube masking" if config.get("tube_masking") else ""))


def batch_words(config: dict) -> str:
    return f"batch {config['batch_size']}" + (" clips" if is_video(config) else "")


def on_words(doc: dict) -> str:
    """'on NVIDIA H200' or 'on cpu: x86_64 (2 logical cores), 2 threads'."""
    threads = doc["config"].get("threads")
    return f"on {doc['device']}" + (f", {threads} thread{'' if threads == 1 else 's'}" if threads else "")


def notes(doc: dict) -> List[str]:
    """Warnings a reader of the table needs: a busy CPU, an MFU the measured peak cannot explain."""
    out = []
    c = doc["config"]
    load, threads, cores = doc.get("load_average_1min"), c.get("threads"), os.cpu_count() or 1
    if load is not None and threads and load + threads > cores + 0.5:
        busy = f"note: the CPU was busy (1-minute load average {load:.1f} on {cores} logical cores)"
        if threads > 1 and str(c.get("omp_wait_policy")).upper() != "PASSIVE":
            out.append(f"{busy} and {threads} OpenMP threads spun while they waited for each other, which can make "
                       "steps many times slower: set OMP_WAIT_POLICY=PASSIVE (the mae-fast command's default) or "
                       "use --threads 1")
        else:
            out.append(f"{busy}: other work shared the cores, so these times are longer and noisier than on an "
                       "idle machine")
    mfus = [r["mfu"] for r in doc["results"] if r.get("mfu") is not None]
    if c.get("dtype") == "bf16" and str(c.get("device", "")).startswith("cpu"):
        out.append("note: mfu in bf16 on a CPU is against a bf16 matmul measured here; a CPU without bf16 "
                   "arithmetic runs that slowly, so the figure says little (compare fp32 runs, or give --peak-tflops)")
    elif mfus and max(mfus) > 1:
        out.append(f"note: mfu above 1: the step ran faster than the peak it is measured against "
                   f"({doc['peak_source']}); give --peak-tflops for a real ceiling")
    return out


def format_results(doc: dict) -> str:
    rows = []
    c = doc["config"]
    video = is_video(c)
    for r in doc["results"]:
        rows.append(dict(
            r,
            peak_mem_MiB="-" if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20,
            GFLOP_per_img=r["flops_per_image"] / 1e9,
            GFLOP_per_clip=r["flops_per_image"] / 1e9,
            clips_per_s=r["images_per_s"],
            TFLOP_per_s=r["tflops_per_s"],
            speedup="-" if r["speedup_vs_reference"] is None else r["speedup_vs_reference"],
        ))
    head = (f"{c['model']}  {describe_input(c)}  {batch_words(c)}  mask ratio "
            f"{c['mask_ratio']}  {c['dtype']}  {on_words(doc)}"
            + (f" x{c['world_size']} (DDP; {'clips' if video else 'images'}/s is the total)"
               if c.get("world_size", 1) > 1 else "")
            + f"  ({c['steps']} timed steps each, interleaved, after {c['warmup']} warm-up)")
    lines = [head, report.format_table(rows, VIDEO_COLUMNS if video else TABLE_COLUMNS),
             f"mfu against {_rate(doc['peak_flops_per_s'])} ({doc['peak_source']})"]
    for r in doc["results"]:
        if r.get("cuda_graph") is False:
            lines.append(f"{r['variant']}: ran eagerly (CUDA graphs need a CUDA device): the same TrainStep call, "
                         "no graph")
    for v, why in doc.get("skipped_variants", {}).items():
        lines.append(f"skipped {v}: {why}")
    lines.extend(notes(doc))
    return "\n".join(lines)
