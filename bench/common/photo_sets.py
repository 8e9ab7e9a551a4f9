"""Generated image sets for the benches: random crops of the built-in photos, saved as JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdvae.data.images import load_rgb


def jpeg_crops(photos: Path, out: Path, size: tuple[int, int], count: int, seed: int = 0) -> None:
    """`count` JPEG crops (quality 90) of `size` (w, h) from the photos in `photos`, into `out`."""
    rng = np.random.default_rng(seed)
    sources = [load_rgb(p, 16, 10**9) for p in sorted(photos.iterdir()) if p.is_file()]
    sources = [s for s in sources if s.shape[0] >= size[1] and s.shape[1] >= size[0]]
    out.mkdir(parents=True)
    for i in range(count):
        src = sources[i % len(sources)]
        top = int(rng.integers(0, src.shape[0] - size[1] + 1))
        left = int(rng.integers(0, src.shape[1] - size[0] + 1))
        crop = src[top : top + size[1], left : left + size[0]]
        Image.fromarray(crop).save(out / f"{i:05d}.jpg", quality=90)
