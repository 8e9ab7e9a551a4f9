"""How one image is stored in the cache: encoded bytes, never raw pixels.

Train images keep their original JPEG bytes when they are already small enough (short side at
most `max_short_side`), plain RGB or grayscale, and upright; otherwise the decoded, upright RGB
image is downscaled to that short side and written as JPEG at `jpeg_quality` (4:4:4) when the
source was a JPEG (no lossless copy of a lossy file is worth 3-5x the bytes), or as PNG
(lossless) when it was not. Eval images are stored as lossless PNGs already resized and
center-cropped, so evaluation reads exactly the pixels it scores.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sdvae.data.images import center_crop, load_rgb, resize_short_side, resize_to

_EXIF_ORIENTATION = 0x0112


def _container(data: bytes) -> tuple[str | None, str, int, int]:
    """(format, mode, EXIF orientation, short side) of encoded image bytes, without decoding pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.format, img.mode, int(img.getexif().get(_EXIF_ORIENTATION, 1)), min(img.size)


def encode(arr: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(arr).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def train_bytes(
    data: bytes, min_size: int, max_pixels: int, max_short_side: int, jpeg_quality: int
) -> tuple[bytes, int, int, str]:
    """(bytes, height, width, how) of one training image file's bytes; raises SkippedImage with the reason."""
    arr = load_rgb(data, min_size, max_pixels)  # validates every file the same way, kept or not
    h, w = arr.shape[:2]
    fmt, mode, orientation, short = _container(data)
    if fmt == "JPEG" and mode in ("RGB", "L") and orientation == 1 and short <= max_short_side:
        return data, h, w, "original"
    if min(h, w) > max_short_side:
        arr = resize_short_side(arr, max_short_side)
    out = "JPEG" if fmt == "JPEG" else "PNG"
    return encode(arr, out, jpeg_quality), h, w, out.lower()


def eval_bytes(data: bytes, min_size: int, max_pixels: int, resolution: int) -> tuple[bytes, int, int, str]:
    """Deterministic eval view: resize the short side to `resolution`, center-crop, lossless PNG."""
    arr = load_rgb(data, min_size, max_pixels)
    h, w = arr.shape[:2]
    return encode(center_crop(resize_short_side(arr, resolution), resolution), "PNG"), h, w, "png"


def stored_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header alone."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode(data: bytes) -> np.ndarray:
    """uint8 HWC RGB at full resolution."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_resized(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """uint8 HWC RGB resized to exactly `size` (width, height).

    A JPEG is decoded at the smallest libjpeg DCT scale (1/2, 1/4, 1/8) whose both sides still
    reach `size`, so large stored images decode fast, and the resize that follows only ever
    shrinks: no pixel comes from a decode smaller than the size asked for."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", size)  # PIL keeps both sides >= size (scale = min(W // w, H // h))
        return resize_to(np.asarray(img.convert("RGB")), size)
