"""Result files and tables of the tools: provenance (device, versions, commit, command), JSON, text tables."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

import torch


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def git_commit() -> str:
    """The checkout's commit (+dirty); MAE_FAST_COMMIT overrides it (copies of a tree without git)."""
    if os.environ.get("MAE_FAST_COMMIT"):
        return os.environ["MAE_FAST_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or len(commit) != 40:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> Dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def provenance(argv: Optional[List[str]] = None, device: Optional[torch.device] = None) -> dict:
    """What a result needs to be reproduced: device, versions, commit, command, date."""
    argv = sys.argv if argv is None else argv
    return {
        "device": device_name(device),
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder if needed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def _cell(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: Iterable[dict], columns: List[str]) -> str:
    """A plain aligned text table of ``columns`` from ``rows`` (missing cells are blank)."""
    rows = list(rows)
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


# --------------------------------------------------------------------------- bench results
def rate(flops_per_s: float) -> str:
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
    lines = [head, format_table(rows, VIDEO_COLUMNS if video else TABLE_COLUMNS),
             f"mfu against {rate(doc['peak_flops_per_s'])} ({doc['peak_source']})"]
    for r in doc["results"]:
        if r.get("cuda_graph") is False:
            lines.append(f"{r['variant']}: ran eagerly (CUDA graphs need a CUDA device): the same TrainStep call, "
                         "no graph")
    for v, why in doc.get("skipped_variants", {}).items():
        lines.append(f"skipped {v}: {why}")
    lines.extend(fused_choice_lines(doc.get("fused_choices") or {}))
    lines.extend(notes(doc))
    return "\n".join(lines)


def fused_choice_lines(choices: dict) -> List[str]:
    """The fused-or-stock choice of every op and shape the fast model measured (mae_fast.nn.fused_choices)."""
    if not choices:
        return []
    out = ["fused ops against their stock counterparts, measured here per shape (forward + backward):"]
    for key, c in choices.items():
        t = c["times_ms"]
        times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in t.items())
        rejected = "".join(f"; {name} {why}" for name, why in c["rejected"].items())
        won = f"{c['speedup']:.2f}x faster than stock" if c["path"] != "stock" else "stock kept"
        out.append(f"  {key}: {c['path']} ({times}; {won}{rejected})")
    return out
