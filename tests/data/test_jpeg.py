"""jpeg_info: what the GPU loader sends to nvJPEG (baseline or progressive 8-bit gray/YCbCr, complete) and what it
leaves to Pillow (CMYK, truncated, not a JPEG)."""
import io

import numpy as np
import pytest
from PIL import Image

from mae_fast.data import jpeg_info



@pytest.mark.parametrize("kwargs,components", [
    ({}, 3), ({"progressive": True}, 3), ({"subsampling": 0}, 3), ({"subsampling": 1}, 3), ({"gray": True}, 1),
    ({"exif": True}, 3),
])
def test_nvjpeg_decodes(files, kwargs, components):
    im = files.photo(0, (37, 23))
    if kwargs.pop("gray", False):
        im = im.convert("L")
    if kwargs.pop("exif", False):
        exif = Image.Exif()
        exif[0x010E] = "a description long enough to make the APP1 segment matter" * 4
        kwargs["exif"] = exif
    info = jpeg_info(files.jpeg_bytes(im, **kwargs))
    assert info is not None and (info.width, info.height, info.components, info.gpu) == (37, 23, components, True)


def test_left_to_pillow(files):
    cmyk = jpeg_info(files.jpeg_bytes(files.photo(1, (20, 10)).convert("CMYK")))
    assert cmyk is not None and cmyk.components == 4 and not cmyk.gpu
    whole = files.jpeg_bytes(files.photo(2, (40, 30)))
    truncated = jpeg_info(whole[:-200])
    assert truncated is not None and (truncated.width, truncated.height) == (40, 30) and not truncated.gpu
    assert jpeg_info(whole + b"\x00" * 7).gpu  # zero padding after the end marker is still complete


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"not a jpeg at all", b"\xff\xd8\xff\xe0\x00\x02\xff"])
def test_not_a_jpeg(data):
    assert jpeg_info(data) is None


def test_png_is_not_a_jpeg():
    b = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(b, "PNG")
    assert jpeg_info(b.getvalue()) is None
