"""What a JPEG file is, from its header alone: its size and whether nvJPEG decodes it on the GPU.

The GPU loader sends a JPEG's bytes to the GPU only when nvJPEG (through torchvision) decodes it to
the same image Pillow would: Huffman-coded baseline or progressive, 8 bits, gray or YCbCr with the usual
chroma subsampling (4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1, 4:1:0), and complete (it ends with the EOI
marker). Everything else (CMYK and YCCK, RGB-coded JPEGs, 12-bit, lossless, arithmetic-coded, truncated
files, other formats) is decoded on the CPU by Pillow, as on the CPU loader.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

# start-of-frame markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NVJPEG_SOF = {0xC0, 0xC2}  # baseline and progressive, Huffman-coded
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)}  # with chroma (1, 1): the subsamplings above


class JpegInfo(NamedTuple):
    width: int
    height: int
    components: int
    gpu: bool  # nvJPEG decodes it as Pillow does


def jpeg_info(data: bytes) -> Optional[JpegInfo]:
    """The header of a JPEG file's bytes, or None when they do not start like a JPEG (up to its first scan)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n = 2, len(data)
    frame, adobe_transform = None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        seg = data[i + 4:i + 2 + length]
        if marker in _SOF:
            if len(seg) < 6 or len(seg) < 6 + 3 * seg[5]:
                return None
            comps = [(seg[6 + 3 * k], seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(seg[5])]
            frame = (marker, seg[0], (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4], comps)
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe_transform = seg[11]
        i += 2 + length
    if frame is None or i + 4 > n or data[i + 1] != 0xDA:
        return None
    marker, precision, height, width, comps = frame
    if not (width and height and comps):
        return None
    gpu = marker in _NVJPEG_SOF and precision == 8 and len(comps) in (1, 3) and _complete(data)
    if gpu and len(comps) == 3:
        ids = bytes(c[0] for c in comps)
        gpu = (all((c[1], c[2]) == (1, 1) for c in comps[1:]) and (comps[0][1], comps[0][2]) in _LUMA_SAMPLING
               and ids != b"RGB" and adobe_transform != 0)  # Adobe transform 0: the channels are RGB
    return JpegInfo(width, height, len(comps), gpu)


def _complete(data: bytes) -> bool:
    """Ends with the EOI marker (trailing zero padding or line ends allowed): not truncated."""
    return data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
