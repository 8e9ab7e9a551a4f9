"""Spatial transforms applied alike to a latent and to its image: the equivariance regulariser's
pairs (training) and the diffusability report's (scoring).

A latent a diffusion model learns easily decodes, after a spatial transform, to the same transform
of its image (EQ-VAE, arXiv 2502.09509; "Improving the Diffusability of Autoencoders", arXiv
2502.14831). Here a transform is a downscale to a given latent size (bilinear, anti-aliased, so a
4x smaller latent averages its values instead of picking every fourth) and a rotation by k x 90°.
The image side gets the same: an anti-aliased bilinear resize to the size the decoder makes of the
transformed latent, and the same rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_DECODED_SIDE = 16  # LPIPS-VGG pools four times: a side under 16 px leaves nothing for its last layer


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bilinear resize in fp32 (no-op at the same size); returns fp32."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class LatentTransform:
    latent_size: tuple[int, int]  # (h, w) of the latent after scaling, before rotation
    quarter_turns: int = 0  # counter-clockwise, 0..3

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        return self._rotate(resize(z, self.latent_size))

    def image(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The image's side of the pair, `size` being what the decoder makes of `latent_size`."""
        return self._rotate(resize(x, size))

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.rot90(t, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns % 4 else t


def min_latent_side(downsample_factor: int) -> int:
    return max(1, math.ceil(MIN_DECODED_SIDE / downsample_factor))


def draw_transform(
    latent_size: tuple[int, int],
    scale: tuple[float, float],
    rotate: bool,
    downsample_factor: int,
    generator: torch.Generator,
) -> LatentTransform:
    """A scale drawn uniformly from `scale` (one factor for both sides, so the aspect is kept) and,
    when `rotate`, a rotation by 0, 90, 180 or 270°; the scaled side never drops below what
    decodes to `MIN_DECODED_SIDE` px (nor grows past the latent)."""
    lo, hi = scale
    s = lo + (hi - lo) * float(torch.rand((), generator=generator))
    floor = min_latent_side(downsample_factor)
    size = tuple(min(side, max(floor, round(side * s))) for side in latent_size)
    turns = int(torch.randint(0, 4, (), generator=generator)) if rotate else 0
    return LatentTransform((size[0], size[1]), turns)
