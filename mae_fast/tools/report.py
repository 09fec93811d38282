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
