"""`mae-fast bench --data DIR`: does the data loader or the training step bound pretraining on this machine?

Times the loaders of ``mae_fast.data`` on the images in DIR, at the model's image size and the bench's
batch: the CPU loader (Pillow in worker processes) with the default number of workers and with one worker
per core, and on CUDA the GPU loader (nvJPEG + one kernel) with the default workers; then the training step
`mae-fast pretrain` runs (``mae_fast+graph``: TrainStep, one CUDA graph per step on a GPU) with the bench's
timing. A loader's images/s is batches delivered on the device (normalised, ready for the step) per second,
after ``warmup`` batches (the workers' start-up), the device synchronised before the clock stops. The loader
`pretrain` would use (gpu on CUDA, cpu elsewhere, default workers) is compared with the step: the slower of
the two bounds training.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import List, Optional

import torch

from ..data import Batches, default_workers, find_images, sample_images
from . import report
from .progress import bar as progress_bar

STEP_VARIANT = "mae_fast+graph"  # what `mae-fast pretrain` trains with


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_rate(paths, size: int, batch_size: int, loader: str, workers: int, device: torch.device, batches: int,
                warmup: int = 1) -> dict:
    """Images per second one loader delivers to ``device`` (see the module docstring)."""
    data = Batches(paths, size, batch_size, workers=workers, device=device, loader=loader)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            next(data)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            next(data)
        sync()
        seconds = time.perf_counter() - t0
    finally:
        data.close()
    return {"loader": loader, "workers": workers, "images_per_s": batches * batch_size / seconds,
            "batches": batches, "seconds": seconds, "skipped_files": len(data.skips)}


def run(cfg, folder: Optional[str], argv: Optional[List[str]] = None, progress: bool = True) -> dict:
    """Loader rates and the training step's rate for bench config ``cfg`` (folder None: the sample photographs)."""
    from . import bench

    paths = sample_images() if folder is None else find_images(folder)
    device = cfg.resolved_device()
    size = cfg.img_size or cfg.dims().img_h
    batches = max(1, cfg.steps)
    default = default_workers()
    plan = [("cpu", default, "default workers"), ("cpu", cores(), "a worker per core")]
    if device.type == "cuda":
        plan.append(("gpu", default, "default workers"))
    rows = []
    bar = progress_bar(len(plan), "bench --data", enabled=progress, unit="loader")
    for loader, workers, why in plan:
        bar.set_description(f"bench --data, {loader} loader with {workers} workers")
        rows.append(dict(loader_rate(paths, size, cfg.batch_size, loader, workers, device, batches,
                                     warmup=max(1, cfg.warmup)), note=why))
        bar.update(1)
    bar.close()

    step_cfg = dataclasses.replace(cfg, variants=cfg.variants or [STEP_VARIANT])
    step_doc = bench.run(step_cfg, argv=argv, progress=progress)
    step = max(step_doc["results"], key=lambda r: r["images_per_s"])
    chosen = next(r for r in rows if r["loader"] == ("gpu" if device.type == "cuda" else "cpu")
                  and r["workers"] == default)
    doc = report.provenance(argv, device)
    doc["config"] = {"images": folder or "sample photographs", "num_images": len(paths), "img_size": size,
                     "batch_size": cfg.batch_size, "timed_batches": batches, "warmup_batches": max(1, cfg.warmup),
                     "cores": cores(), "default_workers": default, "model": cfg.model,
                     "dtype": step_doc["config"]["dtype"]}
    doc["loaders"] = rows
    doc["step"] = {"variant": step["variant"], "images_per_s": step["images_per_s"],
                   "step_ms_median": step["step_ms_median"]}
    doc["pretrain_loader"] = {"loader": chosen["loader"], "workers": chosen["workers"]}
    doc["bound"] = "loader" if chosen["images_per_s"] < step["images_per_s"] else "step"
    doc["notes"] = {"images_per_s": "loaders: normalised batches on the device per second after the warm-up "
                                    "batches; step: the training step of `mae-fast bench` (median)"}
    return doc


def format_results(doc: dict) -> str:
    cfg = doc["config"]
    head = (f"data: {cfg['num_images']} images from {cfg['images']} at {cfg['img_size']}px, batch {cfg['batch_size']}, "
            f"{cfg['timed_batches']} timed batches after {cfg['warmup_batches']}; {cfg['cores']} cores; "
            f"on {doc['device']}")
    rows = [{"loader": r["loader"], "workers": r["workers"], "images_per_s": r["images_per_s"], "note": r["note"]}
            for r in doc["loaders"]]
    rows.append({"loader": f"training step ({doc['step']['variant']})", "workers": "",
                 "images_per_s": doc["step"]["images_per_s"], "note": f"{cfg['model']}, {cfg['dtype']}"})
    table = report.format_table(rows, ["loader", "workers", "images_per_s", "note"])
    chosen = next(r for r in doc["loaders"] if r["loader"] == doc["pretrain_loader"]["loader"]
                  and r["workers"] == doc["pretrain_loader"]["workers"])
    step = doc["step"]["images_per_s"]
    if doc["bound"] == "loader":
        verdict = (f"the loader bounds training: `mae-fast pretrain` loads with the {chosen['loader']} loader and "
                   f"{chosen['workers']} workers at {chosen['images_per_s']:.0f} images/s, the step takes "
                   f"{step:.0f} images/s")
    else:
        verdict = (f"the training step bounds training: {step:.0f} images/s, the {chosen['loader']} loader with "
                   f"{chosen['workers']} workers delivers {chosen['images_per_s']:.0f} images/s")
    return f"{head}\n{table}\n{verdict}"
