"""Checks the commands share, each a ValueError naming the flag: the model name, the device and dtype, and
whether image size, patch size and mask ratio make a model that keeps a patch. Each command's own
``check_config`` (bench, sweep, pretrain) calls the ones it needs."""
from __future__ import annotations

from typing import Optional

import torch

from ..configs import NAMES


def model(name: Optional[str]) -> None:
    if name is not None and name not in NAMES:
        raise ValueError(f"--model {name!r} is unknown; choose one of {sorted(NAMES)}")


def device(name: str) -> torch.device:
    """--device as a torch.device ("auto": CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return dev


def device_and_dtype(device_name: str, dtype: str) -> torch.device:
    dev = device(device_name)
    if dev.type == "cpu" and dtype == "fp16":
        raise ValueError("--dtype fp16 is for CUDA; use fp32 or bf16 on a CPU")
    return dev


def no_patch_kept(dims, mask_ratio: float) -> Optional[str]:
    """Why ``mask_ratio`` leaves the MAE no visible patch (None when it keeps at least one)."""
    if dims.num_kept(mask_ratio) >= 1:
        return None
    n = dims.spatial_patches if dims.tube_masking else dims.num_patches
    best = next((r / 100 for r in range(99, -1, -1) if dims.num_kept(r / 100) >= 1), 0.0)
    return (f"keeps no patch: K = int({n} x (1 - {mask_ratio:g})) = 0 of {n}"
            f"{' spatial' if dims.tube_masking else ''} patches; {best:g} or less keeps at least one")


def sizes(model_name: str, img_size: Optional[int], patch_size: Optional[int], mask_ratio: Optional[float] = None,
          **video):
    """The model's sizes (flops.MAEDims) for these flags; ValueError when they make no model, or when
    ``mask_ratio`` keeps no patch."""
    from .flops import dims_of_config

    try:
        dims = dims_of_config(model_name, img_size, patch_size, **video)
    except ValueError as e:
        raise ValueError(f"--img-size/--patch-size: {e}") from None
    if mask_ratio is not None:
        why = no_patch_kept(dims, mask_ratio)
        if why:
            raise ValueError(f"--mask-ratio {mask_ratio:g} {why}")
    return dims
