"""Decode any image file to 8-bit RGB, or say exactly why it cannot be used.

Real folders hold CMYK JPEGs, 16-bit PNGs, palettes with transparency, EXIF-rotated phone
photos, truncated downloads and the odd text file named .jpg. Each becomes RGB uint8 in
display orientation, or a `SkippedImage` reason that the manifest records.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently gray


class SkippedImage(Exception):
    """The file is not usable; the message is the reason recorded in the manifest."""


def _to_uint8(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16, I, F) -> 8-bit L by scaling its full range."""
    arr = np.asarray(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "I":
        top = 65535 if arr.max() > 255 else 255
        arr8 = (arr.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    else:  # "F"
        arr8 = (
            (arr.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
            if arr.max() <= 1.0
            else arr.clip(0, 255).astype(np.uint8)
        )
    return Image.fromarray(arr8, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_uint8(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "L" and "transparency" in img.info:
        return to_rgb(img.convert("LA"))
    return img.convert("RGB")


def load_rgb(source: str | Path | bytes, min_size: int, max_pixels: int) -> np.ndarray:
    """uint8 HWC RGB in display orientation from a file or its bytes; raises `SkippedImage` with a reason."""
    if isinstance(source, bytes):
        size, opened = len(source), io.BytesIO(source)
    else:
        size, opened = Path(source).stat().st_size, Path(source)
    if size == 0:
        raise SkippedImage("empty file (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SkippedImage(f"decompression bomb guard: {w}x{h} exceeds {max_pixels} pixels")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = to_rgb(img)
    except SkippedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkippedImage(f"decompression bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise SkippedImage("not an image (unidentified format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise SkippedImage(f"unreadable or truncated image: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if min(rgb.size) < min_size:
        raise SkippedImage(f"too small: {rgb.size[0]}x{rgb.size[1]}, data.min_size is {min_size}")
    return np.asarray(rgb, dtype=np.uint8)


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) of an image of `width` x `height` resized so its shorter side is `short`."""
    scale = short / min(height, width)
    return max(short, round(width * scale)), max(short, round(height * scale))


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize to `size` (width, height); the one resampling filter of the house."""
    if (img.shape[1], img.shape[0]) == size:
        return img
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0))


def resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    """Antialiased resize so the shorter side equals `short`."""
    return resize_to(img, short_side_size(img.shape[1], img.shape[0], short))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]
