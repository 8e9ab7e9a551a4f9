"""The naive baseline a learned autoencoder must beat: bicubic down to the latent's size, then up."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bicubic_side(side: int, downsample_factor: int, latent_channels: int, image_channels: int = 3) -> int:
    """Side of an image with as many values as the latent: side * sqrt(c / (3 f^2))."""
    return max(1, round(side * math.sqrt(latent_channels / (image_channels * downsample_factor**2))))


def bicubic_down(x: torch.Tensor, downsample_factor: int, latent_channels: int) -> torch.Tensor:
    """The baseline's "latent": the image, anti-aliased, at the side that keeps the latent's values."""
    h, w = x.shape[-2:]
    small = (bicubic_side(h, downsample_factor, latent_channels), bicubic_side(w, downsample_factor, latent_channels))
    return F.interpolate(x.float(), size=small, mode="bicubic", antialias=True, align_corners=False)


def bicubic_up(small: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The baseline's "decoder"."""
    return F.interpolate(small.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def bicubic_roundtrip(x: torch.Tensor, downsample_factor: int, latent_channels: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return bicubic_up(bicubic_down(x, downsample_factor, latent_channels), (h, w))
