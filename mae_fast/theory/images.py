"""Images for the theory: a user's folder (Pillow) or photographs bundled with scikit-image.

Samples are MAE-style random resized crops (area 20-100 %, aspect 3/4-4/3, random horizontal flip)
resized to size x size, values in [0, 1]. Grayscale is ITU-R 601 luma (Pillow mode "L"); colour is
RGB with the channel last in each pixel (the patchify order).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}

# Photographs inside the scikit-image wheel (skimage/data/*): read from the package folder directly,
# so nothing is ever downloaded.
SAMPLE_FILES = ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "rocket.jpg", "coins.png",
                "moon.png", "brick.png", "grass.png", "gravel.png")


def sample_paths() -> list[Path]:
    """Paths of the bundled sample photographs (needs scikit-image installed; no network)."""
    try:
        import skimage
    except ImportError:
        raise ImportError("the sample photographs come from scikit-image: pip install scikit-image") from None
    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in SAMPLE_FILES if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"no sample photographs found in {folder}")
    return paths


def folder_paths(folder) -> list[Path]:
    """Image files (by extension) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is not a directory")
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"images: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return paths


def load_image(path, color: bool = False, min_side: int | None = None) -> Image.Image:
    """Open one image as "L" or "RGB"; downscale so its short side is at most ``min_side`` (speed)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB" if color else "L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"images: cannot read {path}: {e}") from None
    if im.width < 2 or im.height < 2:
        raise ValueError(f"images: {path} is too small ({im.width}x{im.height})")
    if min_side is not None and min(im.size) > min_side:
        f = min_side / min(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BOX)
    return im


def random_crops(im: Image.Image, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n random resized crops of ``im``: [n, size, size] or [n, size, size, 3], float64 in [0, 1]."""
    W, H = im.size
    out = []
    for _ in range(n):
        area = rng.uniform(0.2, 1.0) * W * H
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = int(round(min(W, math.sqrt(area * aspect))))
        ch = int(round(min(H, math.sqrt(area / aspect))))
        cw, ch = max(cw, 1), max(ch, 1)
        x0 = int(rng.integers(0, W - cw + 1))
        y0 = int(rng.integers(0, H - ch + 1))
        crop = im.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        a = np.asarray(crop, dtype=np.float64) / 255.0  # [size, size(, 3)]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out.append(a)
    return np.stack(out)  # [n, size, size(, 3)]


def image_matrix(paths, size: int, n_samples: int | None = None, color: bool = False, seed: int = 0) -> np.ndarray:
    """Rows of flattened crops from ``paths``: [n, size*size*C] (C = 3 if color else 1).

    ``n_samples`` defaults to 4 d (so S is well conditioned), split evenly over the images (a seeded
    subset of the images when there are more images than samples).
    """
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size: expected an int >= 2, got {size!r}")
    paths = list(paths)
    if not paths:
        raise ValueError("images: no image paths given")
    d = size * size * (3 if color else 1)
    n = 4 * d if n_samples is None else int(n_samples)
    rng = np.random.default_rng(seed)
    if len(paths) > n:  # more images than samples: a seeded subset, one crop each
        paths = [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]
    per = max(1, -(-n // len(paths)))
    rows = []
    for p in paths:
        im = load_image(p, color=color, min_side=4 * size)
        rows.append(random_crops(im, per, size, rng).reshape(per, d))  # [per, d]
    return np.concatenate(rows)[:n]  # [n, d]


def second_moment(X, center: bool = False) -> np.ndarray:
    """S = X^T X / n for rows X ([n, d]); ``center`` subtracts the mean row first."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X: expected [n, d] with n >= 1, got shape {X.shape}")
    if center:
        X = X - X.mean(axis=0)
    return X.T @ X / X.shape[0]  # [d, d]


def images_second_moment(images=None, size: int = 32, n_samples: int | None = None, color: bool = False,
                         seed: int = 0, center: bool = True) -> np.ndarray:
    """S from a folder of images (``images``: path) or, with ``images=None``, the sample photographs.

    ``center`` (default) subtracts the mean crop: S is the pixel covariance. Without it the mean crop
    (nearly flat) is the top principal component and holds most of tr S (89 % on the sample photographs).
    """
    paths = sample_paths() if images is None else folder_paths(os.fspath(images))
    return second_moment(image_matrix(paths, size, n_samples, color, seed), center=center)
