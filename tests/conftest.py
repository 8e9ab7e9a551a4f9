"""Shared fixtures: real photos (scikit-image's bundled set) and cached pretrained networks."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# timings measured by tests (tiny models, a loaded machine) must never reach the user's cache
os.environ["SDVAE_TIMING_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="sdvae-timings-"), "timings.json")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _photo(name: str) -> np.ndarray:
    from sdvae.data.sources import skimage_photo

    return skimage_photo(name)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real RGB photo (scikit-image 'astronaut', 512x512, uint8 HWC)."""
    return _photo("astronaut")


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    return [_photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")]


def to_tensor(img: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 HWC -> float NCHW in [-1, 1], optionally center-cropped and resized to `size`."""
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)[None]
    if size is not None:
        s = min(t.shape[-2:])
        top, left = (t.shape[-2] - s) // 2, (t.shape[-1] - s) // 2
        t = torch.nn.functional.interpolate(
            t[..., top : top + s, left : left + s],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return t.clamp(-1, 1)


@pytest.fixture(scope="session")
def lpips_net():
    from sdvae.metrics import build_lpips

    return build_lpips()
