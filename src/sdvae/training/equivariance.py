"""`loss.equivariance`: which generator steps decode a transformed latent, and how.

The draw for generator step n depends on (train.seed, n) alone: a resumed run, every DDP rank
and a rerun make the same draws at the same steps, whatever came before.
"""

from __future__ import annotations

import torch

from sdvae.config import LossConfig
from sdvae.latent_transforms import LatentTransform, draw_transform


class EquivarianceSchedule:
    def __init__(self, cfg: LossConfig, seed: int, downsample_factor: int) -> None:
        self.cfg, self.seed, self.factor = cfg, seed, downsample_factor

    @property
    def enabled(self) -> bool:
        return self.cfg.equivariance > 0 and self.cfg.equivariance_weight > 0

    def draw(self, g_step: int, latent_size: tuple[int, int]) -> LatentTransform | None:
        """The transform of generator step `g_step`, or None on a step without one."""
        if not self.enabled:
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + g_step)
        if float(torch.rand((), generator=generator)) >= self.cfg.equivariance:
            return None
        c = self.cfg
        return draw_transform(latent_size, c.equivariance_scale, c.equivariance_rotate, self.factor, generator)
