"""Writing images in [-1, 1] as PNG files, atomically; grids carry row labels and a caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sdvae.io import atomic_path

_LABEL_FONT_SIZE = 13
_MARGIN = 6


def to_uint8_image(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of equally sized images (each row a batch in [-1, 1]) tiled into one HWC uint8 array."""
    grid = torch.cat([torch.cat(list(r.detach().float().cpu().clamp(-1, 1)), dim=-1) for r in rows], dim=-2)
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(arr)


def _annotate(pixels: np.ndarray, labels: list[str], caption: str | None) -> Image.Image:
    """A white label column left of each row (and a caption line on top), so a reader knows what is what."""
    font = ImageFont.load_default(size=_LABEL_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        return int(probe.textlength(text, font=font))

    label_w = max(text_width(t) for t in labels) + 2 * _MARGIN
    caption_h = (_LABEL_FONT_SIZE + 2 * _MARGIN) if caption else 0
    h, w = pixels.shape[:2]
    width = max(label_w + w, text_width(caption) + 2 * _MARGIN if caption else 0)
    canvas = Image.new("RGB", (width, caption_h + h), "white")
    canvas.paste(Image.fromarray(pixels), (label_w, caption_h))
    draw = ImageDraw.Draw(canvas)
    row_h = h / len(labels)
    for i, text in enumerate(labels):
        y = caption_h + row_h * (i + 0.5) - _LABEL_FONT_SIZE / 2
        draw.text((_MARGIN, y), text, fill="black", font=font)
    if caption:
        draw.text((_MARGIN, _MARGIN), caption, fill="black", font=font)
    return canvas


def save_rows(
    rows: list[torch.Tensor], path: Path, labels: list[str] | None = None, caption: str | None = None
) -> Path:
    """Stack rows of equally sized images into one PNG; `labels` names each row, `caption` goes on top.

    A single one-image row without labels writes that image as it is (the CLI's outputs).
    """
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    pixels = to_uint8_image(rows)
    image = _annotate(pixels, labels, caption) if labels else Image.fromarray(pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
