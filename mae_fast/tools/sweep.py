"""`mae-fast sweep`: training-step throughput over mask ratios x patch sizes (image size fixed).

At every (ratio, patch size) point the chosen variants (default: reference and mae_fast, eager) run
side by side, interleaved (``bench.run``). Reported per point and variant: images/s, step time,
peak memory, FLOPs per image, MFU, and two speedups:

- ``speedup_vs_ratio0``: over the *reference* at mask ratio 0 with the same patch size, i.e. over an
  unmasked training step (no tokens removed; the loss is then the mean over all patches, since the
  official masked mean divides by zero: see ``variants.AllPatchLoss``). This is what masking buys.
- ``speedup_vs_reference``: over the reference at the same point. This is what mae_fast buys.

``ideal_encoder_speedup`` = 1 / (1 - ratio) is the encoder-only bound for comparison (the decoder
still runs on every token, so an end-to-end step stays below it).
Points where the MAE keeps no patch (K = int(L (1 - ratio)) = 0, e.g. 4 patches at ratio 0.85) are not
run: the document lists them under ``skipped_points`` and the table below its rows. A variant that fails
at a point (out of memory, say) gets a row with ``error``; the table marks it ``failed`` and prints the
message below.
With ``theory`` (a folder of images, or "sample" for the bundled photographs), the linear-MAE
prediction of the learned spatial scale (``mae_fast.theory.predicted_scales``) sits beside each point.

Video (``num_frames`` T > 1, ``t_patch_size`` u, ``tube_masking``): the same sweep over the spatial patch
size with T and u fixed; one sample is a clip (``images_per_s`` is clips/s). The linear theory is for
images and is refused there.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from . import bench, checks, defaults, flops, report, variants
from .progress import bar as progress_bar

DEFAULT_RATIOS = defaults.SWEEP_RATIOS
GPU_DEFAULT = defaults.SWEEP["cuda"]
CPU_DEFAULT = defaults.SWEEP["cpu"]  # the tiny config at 64x64 (patch sizes must divide 64)
DEFAULT_PATCHES = GPU_DEFAULT["patch_sizes"]


@dataclass
class SweepConfig:
    model: str
    batch_size: int
    steps: int
    warmup: int
    patch_sizes: List[int]
    mask_ratios: List[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    img_size: Optional[int] = None
    dtype: str = "auto"
    device: str = "auto"
    variants: Optional[List[str]] = None  # None: reference + mae_fast (when it imports)
    peak_tflops: Optional[float] = None
    theory: Optional[str] = None  # folder of images, "sample", or None
    theory_size: int = 32  # side of the small images the linear theory runs on
    theory_rank: int = 32
    seed: int = 0
    num_frames: int = 1  # video: clips of num_frames frames, tubelets of t_patch_size frames
    t_patch_size: int = 1
    tube_masking: bool = False


def default_config(device: Optional[str] = None, **overrides) -> SweepConfig:
    dev = device or "auto"
    is_cuda = checks.device(dev).type == "cuda"
    base = dict(GPU_DEFAULT if is_cuda else CPU_DEFAULT)
    base["patch_sizes"] = list(base["patch_sizes"])
    extra = {}
    for k, v in overrides.items():
        if v is None:
            continue
        (base if k in base else extra)[k] = v
    if overrides.get("batch_size") is None:  # video: the same tokens per batch as the image default
        base["batch_size"] = bench.video_batch(base["batch_size"], extra.get("num_frames"),
                                                   extra.get("t_patch_size"))
    return SweepConfig(device=dev, **base, **extra)


def check_config(cfg: SweepConfig) -> int:
    """Validate; returns the image size. ValueError names the bad setting."""
    checks.model(cfg.model)
    checks.device_and_dtype(cfg.device, cfg.dtype if cfg.dtype != "auto" else "fp32")
    bench.check_video(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking)
    if cfg.theory and _video(cfg):
        raise ValueError("--theory: the linear-MAE theory is for image models; it does not apply with --num-frames")
    img = cfg.img_size or flops.dims_of_config(cfg.model).img_h
    if not cfg.mask_ratios:
        raise ValueError("--mask-ratios: give at least one ratio")
    for r in cfg.mask_ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--mask-ratios: every ratio must be in [0, 1), got {r}")
    if not cfg.patch_sizes:
        raise ValueError("--patch-sizes: give at least one patch size")
    for p in cfg.patch_sizes:
        if p < 1 or img % p:
            raise ValueError(f"--patch-sizes: {p} does not divide the image size {img}")
    return img


def _video(cfg: SweepConfig) -> bool:
    return bool(flops.video_kwargs(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking))


def _variants(cfg: SweepConfig) -> tuple:
    if cfg.variants:
        probe = bench.BenchConfig(model=cfg.model, batch_size=1, steps=1, warmup=1, variants=cfg.variants)
        return variants.resolve_variants(probe)
    if variants.fast_available():
        return ["reference", "mae_fast"], {}
    try:
        variants.fast_models_module()
    except variants.VariantUnavailable as e:
        return ["reference"], {"mae_fast": str(e)}
    return ["reference", "mae_fast"], {}  # pragma: no cover


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _point(cfg: SweepConfig, img: int, p: int, r: float, names: List[str], peak, argv) -> List[dict]:
    """One (ratio, patch) point: all variants interleaved; a variant that fails gets an error row."""
    bc = bench.BenchConfig(model=cfg.model, batch_size=cfg.batch_size, steps=cfg.steps, warmup=cfg.warmup,
                               mask_ratio=r, img_size=img, patch_size=p, dtype=cfg.dtype, device=cfg.device,
                               seed=cfg.seed, variants=names, compile=None, num_frames=cfg.num_frames,
                               t_patch_size=cfg.t_patch_size, tube_masking=cfg.tube_masking)
    try:
        return bench.run(bc, argv=argv, progress=False, peak=peak)["results"]
    except Exception:  # noqa: BLE001 - retry one by one, so one failing variant does not hide the others
        pass
    _free(bc.resolved_device())  # after the except block: the traceback (and its tensors) is gone
    rows = []
    for v in names:
        bc.variants = [v]
        try:
            (row,) = bench.run(bc, argv=argv, progress=False, peak=peak)["results"]
        except Exception as e:  # noqa: BLE001 - recorded in the results (OOM, a model that rejects the point)
            row = {"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        _free(bc.resolved_device())
        rows.append(row)
    return rows


def run(cfg: SweepConfig, argv: Optional[List[str]] = None, progress: bool = True) -> dict:
    img = check_config(cfg)
    names, skipped = _variants(cfg)
    device = bench.BenchConfig(model=cfg.model, batch_size=1, steps=1, warmup=1, device=cfg.device).resolved_device()
    probe = bench.BenchConfig(model=cfg.model, batch_size=1, steps=1, warmup=1, dtype=cfg.dtype, device=cfg.device,
                                  peak_tflops=cfg.peak_tflops)
    peak = bench.measure_peak(probe, device)
    ratios = sorted(set(float(r) for r in cfg.mask_ratios) | {0.0})  # ratio 0 is the baseline of every curve
    patches = sorted(set(int(p) for p in cfg.patch_sizes))
    theory_rows = None
    if cfg.theory:  # first: a bad folder fails before minutes of timing
        from ..theory import predicted_scales

        images = None if cfg.theory == "sample" else cfg.theory
        theory_rows = predicted_scales([(r, p) for p in patches for r in ratios], images=images, image_size=img,
                                       size=cfg.theory_size, rank=cfg.theory_rank)
    points, skipped_points = [], []
    for p in patches:
        dims = flops.dims_of_config(cfg.model, img, p, **flops.video_kwargs(cfg.num_frames, cfg.t_patch_size,
                                                                            cfg.tube_masking))
        for r in ratios:
            if dims.num_kept(r) >= 1:
                points.append((p, r))
            else:
                skipped_points.append({"patch_size": p, "mask_ratio": r, "patches": dims.num_patches,
                                       "why": "the MAE keeps no patch: int(L (1 - ratio)) = 0"})
    rows: List[dict] = []
    with progress_bar(len(points), "sweep", enabled=progress, unit="point") as bar:
        for p, r in points:
            bar.set_description(f"sweep, p={p} ratio={r:g}")
            for row in _point(cfg, img, p, r, names, peak, argv):
                rows.append(dict(row, patch_size=p, mask_ratio=r, ideal_encoder_speedup=1.0 / (1.0 - r)))
            _free(device)
            bar.update(1)
    # speedups
    by = {(x["patch_size"], x["mask_ratio"], x["variant"]): x for x in rows}
    for x in rows:
        base = by.get((x["patch_size"], 0.0, "reference"))
        ref = by.get((x["patch_size"], x["mask_ratio"], "reference"))
        ok = "images_per_s" in x
        x["speedup_vs_ratio0"] = x["images_per_s"] / base["images_per_s"] if ok and base and "images_per_s" in base else None
        x["speedup_vs_reference"] = x["images_per_s"] / ref["images_per_s"] if ok and ref and "images_per_s" in ref else None
    if theory_rows is not None:
        pred = {(t["patch_size"], t["mask_ratio"]): t for t in theory_rows}
        for x in rows:
            t = pred.get((x["patch_size"], x["mask_ratio"]))
            if t:
                x["predicted_mean_distance_px"] = t["mean_distance_px"]
                x["predicted_mean_distance_frac"] = t["mean_distance_frac"]
                x["predicted_outside_patch_fraction"] = t["outside_patch_fraction"]
                x["predicted_data_mean_distance_px"] = t["data_mean_distance_px"]
                if t["flag"]:  # the theory does not apply here (e.g. the MAE keeps no patch): no prediction
                    x["predicted_flag"] = t["flag"]
    doc = report.provenance(argv, device)
    doc["config"] = dict(asdict(cfg), img_size=img, mask_ratios=ratios, patch_sizes=patches, variants=names,
                         device=str(device), video=_video(cfg),
                         dtype=bench.BenchConfig(model=cfg.model, batch_size=1, steps=1, warmup=1, dtype=cfg.dtype,
                                                     device=cfg.device).resolved_dtype())
    doc["peak_flops_per_s"], doc["peak_source"] = peak
    doc["notes"] = {
        "speedup_vs_ratio0": "images/s over the reference at mask ratio 0, same patch size (an unmasked step)",
        "mask_ratio_0": "loss over all patches (the official masked mean divides by zero at ratio 0)",
        "speedup_vs_reference": "images/s over the reference at the same point",
        "ideal_encoder_speedup": "1 / (1 - ratio): the encoder-only bound",
    }
    if _video(cfg):
        doc["notes"]["video"] = "one sample is a clip [C, T, H, W]: images_per_s and flops_per_image are per clip"
    if device.type == "cpu":
        doc["config"]["threads"] = torch.get_num_threads()
    if skipped:
        doc["skipped_variants"] = skipped
    if skipped_points:
        doc["skipped_points"] = skipped_points
    if theory_rows is not None:
        doc["theory"] = {"images": cfg.theory, "rows": theory_rows}
    doc["results"] = rows
    return doc


TABLE_COLUMNS = ["patch_size", "mask_ratio", "variant", "images_per_s", "step_ms_median", "peak_mem_MiB", "mfu",
                 "speedup_vs_ratio0", "speedup_vs_reference", "ideal_encoder_speedup"]


def _describe(c: dict) -> str:
    """'64px' for images; '4 frames x 64px, tubelet 2 frames x p x p, tube masking' for video (p varies)."""
    if not report.is_video(c):
        return f"{c['img_size']}px"
    return (f"{c['num_frames']} frames x {c['img_size']}px, tubelet {c['t_patch_size']} frames x p x p"
            + (", tube masking" if c.get("tube_masking") else ""))


def format_results(doc: dict) -> str:
    rows = []
    rate = "clips_per_s" if report.is_video(doc["config"]) else "images_per_s"
    cols = [rate if c == "images_per_s" else c for c in TABLE_COLUMNS]
    if "theory" in doc:  # the linear MAE's scale: on every weight, and on the directions the data carries
        cols += ["predicted_mean_distance_px", "predicted_data_mean_distance_px"]
    failures = []
    for x in doc["results"]:
        if "error" in x:
            rows.append({"patch_size": x["patch_size"], "mask_ratio": x["mask_ratio"], "variant": x["variant"],
                         rate: "failed", **{c: "-" for c in cols[4:]}})
            failures.append(f"failed: p={x['patch_size']} ratio={x['mask_ratio']:g} {x['variant']}: {x['error']}")
            continue
        rows.append(dict(x, clips_per_s=x["images_per_s"],
                         peak_mem_MiB="-" if x.get("peak_mem_bytes") is None else x["peak_mem_bytes"] / 2**20,
                         speedup_vs_ratio0="-" if x["speedup_vs_ratio0"] is None else x["speedup_vs_ratio0"],
                         **{k: "-" if x.get(k) is None else x[k]
                            for k in ("predicted_mean_distance_px", "predicted_data_mean_distance_px")},
                         speedup_vs_reference="-" if x["speedup_vs_reference"] is None else x["speedup_vs_reference"]))
    c = doc["config"]
    head = (f"sweep: {c['model']}  {_describe(c)}  {report.batch_words(c)}  {c['dtype']}  {report.on_words(doc)}  "
            f"({c['steps']} timed steps per point after {c['warmup']} warm-up, variants interleaved)")
    lines = [head, report.format_table(rows, cols), *failures]
    by_patch: dict = {}
    for x in doc.get("skipped_points", []):
        by_patch.setdefault((x["patch_size"], x["patches"]), []).append(f"{x['mask_ratio']:g}")
    for (p, n), rs in by_patch.items():
        lines.append(f"not run at p={p} ({n} patches), ratio {', '.join(rs)}: the MAE keeps no patch "
                     "(int(L (1 - ratio)) = 0)")
    for v, why in doc.get("skipped_variants", {}).items():
        lines.append(f"skipped {v}: {why}")
    not_run = {(x["patch_size"], x["mask_ratio"]) for x in doc.get("skipped_points", [])}
    for t in doc.get("theory", {}).get("rows", []):
        if t.get("flag") and (t["patch_size"], t["mask_ratio"]) not in not_run:
            lines.append(f"theory at p={t['patch_size']} ratio={t['mask_ratio']:g}: no prediction, {t['flag']}")
    if "theory" in doc:
        from ..theory.cli import MODEL_NOTE
        lines.append(f"predicted_* columns, {MODEL_NOTE}")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """PNG: speedup over the unmasked reference step against the mask ratio, one curve per patch size
    (solid: mae_fast, dashed: reference), with the ideal encoder-only curve 1/(1 - ratio). Bars: the
    point's p20-p80 step times (against the baseline's median). Points that failed or were not run are
    listed under the plot. With theory rows, a second panel: measured speedup against the predicted
    spatial scale, point by point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in doc["results"] if x.get("speedup_vs_ratio0") is not None]
    patches = sorted({x["patch_size"] for x in rows})
    ratios = sorted({x["mask_ratio"] for x in doc["results"]})
    theory = [x for x in rows if x.get("predicted_mean_distance_px") is not None]
    if theory:  # cost against what is learned: a second panel
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    else:
        fig, ax = plt.subplots(figsize=(7, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"reference": "--", "reference+compile": ":", "mae_fast": "-", "mae_fast+compile": "-."}
    for i, p in enumerate(patches):
        for v in sorted({x["variant"] for x in rows}):
            pts = sorted((x["mask_ratio"], x["speedup_vs_ratio0"], *_spread(x)) for x in rows
                         if x["patch_size"] == p and x["variant"] == v)
            if pts:
                xs, ys, lo, hi = (list(t) for t in zip(*pts))
                ax.errorbar(xs, ys, yerr=[[max(0.0, y - a) for y, a in zip(ys, lo)], [max(0.0, b - y) for y, b in zip(ys, hi)]],
                            fmt=styles.get(v, "-"), marker="o", ms=3, capsize=2, elinewidth=0.8,
                            color=colors[i % len(colors)], label=f"p={p} {v}")
    grid = [r / 100 for r in range(0, int(max(ratios) * 100) + 1)] if ratios else []
    ax.plot(grid, [1 / (1 - r) for r in grid], "k:", label="ideal encoder-only 1/(1-r)")
    ax.set_yscale("log")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("speedup over the unmasked reference step")
    c = doc["config"]
    ax.set_title(f"{c['model']} {_describe(c)}, {report.batch_words(c)}, {c['dtype']}, {doc['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if theory:
        fast = "mae_fast" if any(x["variant"] == "mae_fast" for x in theory) else theory[0]["variant"]
        for i, p in enumerate(patches):
            pts = sorted((x["predicted_mean_distance_px"], x["speedup_vs_ratio0"], x["mask_ratio"])
                         for x in theory if x["patch_size"] == p and x["variant"] == fast)
            if pts:
                ax2.plot([a for a, _, _ in pts], [b for _, b, _ in pts], "-", marker="o", ms=4,
                         color=colors[i % len(colors)], label=f"p={p}")
                for a, b, r in pts:
                    ax2.annotate(f"{r:g}", (a, b), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax2.set_yscale("log")
        ax2.set_xlabel("predicted spatial scale: mean distance (px), linear MAE")
        ax2.set_ylabel(f"speedup over the unmasked reference step ({fast})")
        ax2.set_title(f"cost against what is learned (labels: mask ratio; images: {doc['theory']['images']})",
                      fontsize=9)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    missing = [f"p={x['patch_size']} ratio {x['mask_ratio']:g} {x['variant']} failed" for x in doc["results"]
               if "error" in x]
    missing += [f"p={x['patch_size']} ratio {x['mask_ratio']:g} not run (keeps no patch)"
                for x in doc.get("skipped_points", [])]
    if missing:
        shown = missing[:8] + ([f"and {len(missing) - 8} more"] if len(missing) > 8 else [])
        fig.text(0.01, 0.01, "not plotted: " + "; ".join(shown), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if missing else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(x: dict) -> tuple:
    """(low, high) speedup from the point's p80 and p20 step times (its median gives the speedup itself)."""
    s, med = x["speedup_vs_ratio0"], x.get("step_ms_median")
    if not med or not x.get("step_ms_p20") or not x.get("step_ms_p80"):
        return s, s
    return s * med / x["step_ms_p80"], s * med / x["step_ms_p20"]
