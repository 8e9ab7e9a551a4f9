"""Running statistics that stay constant in memory and sum across DDP ranks.

Every state is a float64 sum registered with torchmetrics, so `compute()` on any rank sees the
whole set after an all-reduce, and the order images arrive in (or how they are sharded) moves
the result only by float64 round-off.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class Moments(Metric):
    """Mean, std (population) and count of a stream of per-image values."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("total", "squares", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().to(torch.float64).flatten()
        self.total += v.sum()
        self.squares += v.pow(2).sum()
        self.count += v.numel()

    def compute(self) -> dict[str, float | int | None]:
        n = int(self.count)
        if n == 0:
            return {"mean": None, "std": None, "n": 0}
        mean = float(self.total) / n
        return {"mean": mean, "std": math.sqrt(max(0.0, float(self.squares) / n - mean**2)), "n": n}


class ChannelMoments(Metric):
    """Per-channel mean and std of latents over every spatial position of every image, and the
    factors a diffusion model would use to bring them to unit variance: 1 / std (SD 1.x / SDXL's
    `scaling_factor`, latents * s) and the mean (SD3 / FLUX's `shift_factor`, (z - m) * s).
    Named `*_of_modes`: these latents are posterior modes, while export computes the factors it
    ships from posterior samples (what a diffusion model trains on), a slightly larger std."""

    full_state_update = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        for name in ("total", "squares"):
            self.add_state(name, torch.zeros(channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, latents: torch.Tensor) -> None:
        z = latents.detach().to(torch.float64).transpose(0, 1).reshape(self.channels, -1)
        self.total += z.sum(dim=1)
        self.squares += z.pow(2).sum(dim=1)
        self.count += z.shape[1]

    def compute(self) -> dict[str, object]:
        n = float(self.count)
        if n == 0:
            return {"channels": self.channels, "values": 0}
        mean = self.total / n
        std = (self.squares / n - mean.pow(2)).clamp(min=0).sqrt()
        overall_mean = float(self.total.sum()) / (n * self.channels)
        overall_var = float(self.squares.sum()) / (n * self.channels) - overall_mean**2
        overall_std = math.sqrt(max(overall_var, 0.0))
        return {
            "channels": self.channels,
            "values": int(n * self.channels),
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "overall_mean": overall_mean,
            "overall_std": overall_std,
            "scaling_factor_of_modes": 1.0 / overall_std if overall_std > 0 else None,
            "shift_factor_of_modes": overall_mean,
        }
