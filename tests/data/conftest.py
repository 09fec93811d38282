"""The data tests run the loaders as a CPU user's run does: no Triton interpreter, so the GPU loader's CPU twin
resizes on the op's torch path (tests/ops/test_resized_crop.py runs the kernel). The ``files`` fixture writes
image files of every kind the loaders meet."""
import io

import numpy as np
import pytest
from PIL import Image

from mae_fast import data


@pytest.fixture(autouse=True)
def _plain_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def photo(k: int, size=(50, 38)) -> Image.Image:
    """Sample photograph k (of 10) as a small RGB image."""
    return data.load_rgb(data.sample_images()[k % 10]).resize(size, Image.Resampling.BICUBIC)


def synthetic_photo(seed: int, size=(500, 375)) -> Image.Image:
    """A photograph-like RGB image without scikit-image (the GPU machines may lack it): smooth random colour
    fields with edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    a = np.asarray(coarse, dtype=np.float32)
    a[: size[1] // 3] = a[: size[1] // 3] * 0.6 + 90  # an edge across the image
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(a.clip(0, 255).round().astype(np.uint8))


def jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=kwargs.pop("quality", 90), **kwargs)
    return b.getvalue()


def bad_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose header parses but whose Huffman table Pillow refuses ("broken data stream")."""
    d = bytearray(jpeg)
    i = d.index(b"\xff\xc4")
    d[i + 5:i + 21] = bytes([255] * 16)
    return bytes(d)


def write_mixed_folder(folder, bad: bool = True):
    """A folder of every kind of file: baseline, progressive, 4:4:4 and gray JPEGs, a CMYK JPEG, a PNG, a 16-bit
    gray PNG, RGBA, palette; with ``bad``, also a truncated JPEG, a broken Huffman table, an empty file, text
    named .gif. Returns the names of the unreadable ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_baseline.jpg").write_bytes(jpeg_bytes(photo(0)))
    (folder / "b_progressive.jpg").write_bytes(jpeg_bytes(photo(1, (41, 57)), progressive=True))
    (folder / "c_444.jpg").write_bytes(jpeg_bytes(photo(2, (33, 33)), subsampling=0))
    (folder / "d_gray.jpg").write_bytes(jpeg_bytes(photo(3).convert("L")))
    (folder / "e_cmyk.jpg").write_bytes(jpeg_bytes(photo(4).convert("CMYK")))
    photo(5, (29, 40)).save(folder / "f_photo.png")
    ramp = (np.linspace(0, 65535, 24 * 31).reshape(24, 31)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "g_16bit.png")
    photo(6).convert("RGBA").save(folder / "h_rgba.png")
    photo(7).convert("P").save(folder / "i_palette.png")
    names = []
    if bad:
        (folder / "j_truncated.jpg").write_bytes(jpeg_bytes(photo(8))[:-300])
        (folder / "k_huffman.jpg").write_bytes(bad_huffman(jpeg_bytes(photo(9))))
        (folder / "l_empty.png").write_bytes(b"")
        (folder / "m_text.gif").write_text("not an image")
        names = ["j_truncated.jpg", "k_huffman.jpg", "l_empty.png", "m_text.gif"]
    (folder / "n_last.jpg").write_bytes(jpeg_bytes(photo(0, (64, 48))))
    return names


class Files:
    photo = staticmethod(photo)
    synthetic_photo = staticmethod(synthetic_photo)
    jpeg_bytes = staticmethod(jpeg_bytes)
    bad_huffman = staticmethod(bad_huffman)
    write_mixed_folder = staticmethod(write_mixed_folder)


@pytest.fixture
def files():
    return Files
