"""The training loader as it was before crops were decoded at their drawn scale: the reference
the loader and convergence benches measure the fix against.

Each stored JPEG was decoded at the DCT scale whose short side reaches the bottom of
`data.train_short_side`, then resized (up, for most draws) to the drawn short side.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import sdvae.data.datamodule as dm


def legacy_crop(
    data: bytes, resolution: int, short_side: tuple[int, int], generator: torch.Generator | None = None
) -> np.ndarray:
    lo = max(short_side[0], resolution)
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            w, h = img.size
            scale = lo / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        arr = np.asarray(img.convert("RGB"))
    return dm.random_crop(arr, resolution, short_side, generator)


def use_legacy_loader() -> None:
    """Swap the legacy crop into `TrainImages` (this process and loaders it forks)."""
    dm.random_crop_encoded = legacy_crop
