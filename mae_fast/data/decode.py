"""Reading one image file as 8-bit RGB on the CPU (Pillow), with the conversions both loaders share.

Converted: RGB as it is; gray, gray + alpha, palette, RGBA, CMYK, YCbCr and 1-bit images by Pillow's
``convert("RGB")``, as the official MAE's loader (alpha is dropped, not blended); 16-bit gray ("I;16"
and its byte orders) and 32-bit integer gray ("I", read as 16-bit data) scaled to 8 bits as
round(v / 257), so 65535 is 255 and a mid-grey 32768 is 128 (Pillow's own conversion clips them to
255); multi-frame files: their first frame. Skipped (:class:`UnreadableImage`): anything Pillow cannot
open or decode (not an image, truncated, corrupt, too large for Pillow's decompression-bomb limit),
32-bit float images (mode "F": no defined range) and modes without an RGB conversion.
EXIF orientation is not applied (as the official loader).
"""
from __future__ import annotations

import io
import warnings
from typing import Union

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImage(ValueError):
    """A file that is not an image both loaders can train on (the message says why)."""


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB (see the module docstring); UnreadableImage where there is none."""
    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.float64)  # [H, W], the stored values
        levels = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(levels, "L").convert("RGB")
    if im.mode == "F":
        raise UnreadableImage("32-bit float pixels (mode F) have no defined range")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow asks for this route for palettes with a transparent colour
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise UnreadableImage(f"mode {im.mode} has no RGB conversion ({e})") from None


def decode_rgb(source: Union[str, bytes, bytearray, memoryview], name: str = "") -> Image.Image:
    """Open and fully decode a file (a path, or its bytes) as 8-bit RGB; UnreadableImage naming ``name``
    (or the path) and the reason on any failure."""
    where = name or str(source)
    im = rgb = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings (EXIF, large images) would repeat per sample
            im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
            im.load()  # a single-frame file opened by name is closed once loaded
            rgb = to_rgb(im)
            if rgb is im and getattr(im, "n_frames", 1) > 1:
                rgb = im.copy()  # the first frame, detached from the file kept open for the others
        return rgb
    except UnreadableImage as e:
        raise UnreadableImage(f"cannot read image {where}: {e}") from None
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableImage(f"cannot read image {where}: {reason}") from None
    finally:
        if im is not None and rgb is not im:
            im.close()


def load_rgb(path) -> Image.Image:
    """The file at ``path`` as 8-bit RGB (UnreadableImage, a ValueError, when it cannot be)."""
    return decode_rgb(str(path))
