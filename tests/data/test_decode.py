"""Reading files as 8-bit RGB: the conversions (16-bit at its precision: a mid-grey stays mid-grey) and the
files skipped, with the reason."""
import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from mae_fast.data import UnreadableImage, decode_rgb, load_rgb



def png(arr: np.ndarray, mode=None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, "PNG")
    return b.getvalue()


def test_16_bit_gray_keeps_its_precision():
    mid = decode_rgb(png(np.full((5, 7), 32768, np.uint16)))
    assert mid.mode == "RGB" and np.all(np.asarray(mid) == 128)  # Pillow's own convert("RGB") gives 255
    ramp = np.arange(0, 65536, 7, dtype=np.uint16)[:4096].reshape(64, 64)
    got = np.asarray(decode_rgb(png(ramp)))
    expect = np.rint(ramp / 257.0).astype(np.uint8)
    assert all(np.array_equal(got[..., c], expect) for c in range(3))
    assert got.max() == expect.max() > 100 and len(np.unique(got)) > 100  # the whole range, not clipped at 255


def test_32_bit_integer_gray_is_read_as_16_bit():
    b = io.BytesIO()
    Image.fromarray(np.array([[0, 257, 32768, 65535, 70000, -5]], np.int32)).save(b, "TIFF")
    assert np.asarray(decode_rgb(b.getvalue()))[0, :, 0].tolist() == [0, 1, 128, 255, 255, 0]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_8_bit_modes_convert_as_pillow(files, mode):
    im = files.photo(3, (9, 6)).convert(mode)
    b = io.BytesIO()
    im.save(b, "TIFF")
    assert np.array_equal(np.asarray(decode_rgb(b.getvalue())), np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB")))


def test_palette_with_transparency_quietly(files):
    im = files.photo(4, (8, 8)).convert("P")
    im.info["transparency"] = 0
    b = io.BytesIO()
    im.save(b, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_rgb(b.getvalue()).mode == "RGB"


@pytest.mark.parametrize("content,reason", [
    (b"", "cannot identify image file"),
    (b"hello", "cannot identify image file"),
    ("truncated", "truncated"),
    ("huffman", "broken data stream"),
    ("float", "32-bit float pixels (mode F) have no defined range"),
])
def test_unreadable_files_say_why(files, tmp_path, content, reason):
    if content == "truncated":
        content = files.jpeg_bytes(files.photo(0))[:-300]
    elif content == "huffman":
        content = files.bad_huffman(files.jpeg_bytes(files.photo(1)))
    elif content == "float":
        b = io.BytesIO()
        Image.fromarray(np.full((3, 3), 0.5, np.float32)).save(b, "TIFF")
        content = b.getvalue()
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=f"cannot read image {re.escape(str(path))}: .*{re.escape(reason)}"):
        load_rgb(path)
    assert issubclass(UnreadableImage, ValueError)
