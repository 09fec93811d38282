"""Which files a run trains on: image files under a folder (by extension), or the sample photographs."""
from __future__ import annotations

from pathlib import Path
from typing import List

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def find_images(folder) -> List[Path]:
    """Image files under ``folder`` (subfolders included, e.g. an ImageNet class layout; hidden files and
    folders left out), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return paths


def sample_images() -> List[Path]:
    """The photographs shipped inside scikit-image (read from its package folder; nothing is downloaded)."""
    from ..theory.images import sample_paths

    return sample_paths()
