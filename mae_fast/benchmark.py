"""Training-step throughput: forward, backward and an AdamW step, timed per step.

Used by `mae-fast bench`. Today it times the reference model (mae_fast.reference); the
side-by-side comparison with the fast model and torch.compile extends ``VARIANTS``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import benchutil, reference

CPU_DEFAULT = dict(model="mae_vit_tiny_patch8", batch_size=32, steps=20, warmup=3)
GPU_DEFAULT = dict(model="mae_vit_base_patch16", batch_size=256, steps=30, warmup=5)


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
    variants: List[str] = field(default_factory=lambda: ["reference"])

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.resolved_device().type == "cuda" else "fp32"


def default_config(device: Optional[str] = None, **overrides) -> BenchConfig:
    """The embedded default: ViT-B/16 at batch 256 on a GPU, a tiny model on a CPU."""
    dev = device or "auto"
    is_cuda = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else torch.device(dev)).type == "cuda"
    base = dict(GPU_DEFAULT if is_cuda else CPU_DEFAULT)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(device=dev, **base)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def build_reference(cfg: BenchConfig, device: torch.device) -> torch.nn.Module:
    kwargs = {"norm_pix_loss": cfg.norm_pix_loss}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    return reference.create_model(cfg.model, **kwargs).to(device)


VARIANTS: Dict[str, Callable[[BenchConfig, torch.device], torch.nn.Module]] = {
    "reference": build_reference,
}


def _train_step_fn(model, opt, imgs_pool, cfg: BenchConfig, device: torch.device):
    state = {"i": 0}
    dtype = cfg.resolved_dtype()

    def step():
        imgs = imgs_pool[state["i"] % len(imgs_pool)]
        state["i"] += 1
        with _autocast(device, dtype):
            loss, _, _ = model(imgs, mask_ratio=cfg.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_variant(name: str, cfg: BenchConfig, progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Time ``cfg.steps`` training steps of one variant after ``cfg.warmup`` untimed ones."""
    device = cfg.resolved_device()
    torch.manual_seed(cfg.seed)
    model = VARIANTS[name](cfg, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    C = model.patch_embed.in_chans
    H, W = model.patch_embed.img_size
    # a few distinct random batches, rotated (never zeros; no single buffer that stays in cache)
    imgs_pool = [torch.randn(cfg.batch_size, C, H, W, device=device) for _ in range(3)]
    step = _train_step_fn(model, opt, imgs_pool, cfg, device)

    cuda = device.type == "cuda"
    for i in range(cfg.warmup):
        step()
        if progress:
            progress(f"{name} warm-up", i + 1, cfg.warmup)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    last_loss = None
    for i in range(cfg.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last_loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            last_loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress(name, i + 1, cfg.steps)
    q = benchutil._quantiles(times)
    loss_value = float(last_loss.detach().float().item())
    if not torch.isfinite(torch.tensor(loss_value)):
        raise RuntimeError(f"{name}: the loss is not finite ({loss_value}); the benchmark is meaningless")
    return {
        "variant": name,
        "images_per_s": cfg.batch_size / (q["median_ms"] * 1e-3),
        "step_ms_median": q["median_ms"],
        "step_ms_p20": q["p20_ms"],
        "step_ms_p80": q["p80_ms"],
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "final_loss": loss_value,
        "steps": cfg.steps,
    }


def _stderr_progress(label: str, i: int, n: int) -> None:
    width = 24
    done = int(width * i / n)
    sys.stderr.write(f"\r  {label:<22} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(cfg: BenchConfig, argv: Optional[List[str]] = None, progress: bool = True) -> dict:
    """Run every variant of ``cfg`` and return the results document (provenance + results)."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {sorted(VARIANTS)}")
    device = cfg.resolved_device()
    show = progress and sys.stderr.isatty()  # a bar on a terminal, nothing in logs
    results = [run_variant(v, cfg, _stderr_progress if show else None) for v in cfg.variants]
    ref = next((r for r in results if r["variant"] == "reference"), None)
    for r in results:
        r["speedup_vs_reference"] = (r["images_per_s"] / ref["images_per_s"]) if ref else None
    doc = benchutil.provenance(argv, device)
    doc["config"] = dict(asdict(cfg), device=str(device), dtype=cfg.resolved_dtype())
    doc["results"] = results
    return doc


TABLE_COLUMNS = ["variant", "images_per_s", "step_ms_median", "step_ms_p20", "step_ms_p80", "peak_mem_MiB", "speedup"]


def format_results(doc: dict) -> str:
    rows = []
    for r in doc["results"]:
        rows.append(dict(
            r,
            peak_mem_MiB="-" if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20,
            speedup="-" if r["speedup_vs_reference"] is None else r["speedup_vs_reference"],
        ))
    c = doc["config"]
    head = (f"{c['model']}  batch {c['batch_size']}  mask ratio {c['mask_ratio']}  {c['dtype']}  "
            f"on {doc['device']}  ({c['steps']} timed steps after {c['warmup']} warm-up)")
    return head + "\n" + benchutil.format_table(rows, TABLE_COLUMNS)
