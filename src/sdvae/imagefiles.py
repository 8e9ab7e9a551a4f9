"""Writing images in [-1, 1] as PNG files, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdvae.io import atomic_path


def save_rows(rows: list[torch.Tensor], path: Path) -> Path:
    """Stack rows of equally sized images (each row a batch in [-1, 1]) into one PNG.

    A single one-image row writes that image as it is.
    """
    grid = torch.cat([torch.cat(list(r.detach().float().cpu().clamp(-1, 1)), dim=-1) for r in rows], dim=-2)
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    return Path(path)
