"""How easily a diffusion model could learn a model's latents, beside how well it reconstructs.

Four figures per model (docs/evaluation.md, with the paper each follows):
- scale equivariance: decode(downsample2x(z)) against downsample2x(x), per-image PSNR and LPIPS
  ("Improving the Diffusability of Autoencoders", arXiv 2502.14831; EQ-VAE, arXiv 2502.09509);
- rotation equivariance: decode(rot90(z)) against rot90(x), per-image PSNR (EQ-VAE);
- latent spectrum: the share of 2D DCT power above half the latent's Nyquist frequency (radially,
  the DC term left out), averaged over channels, next to the same share of the RGB image resized
  to the latent's size (arXiv 2502.14831 compares the two spectra);
- iFID: FID against the originals of decodes of each latent interpolated halfway with its nearest
  neighbour in the set (arXiv 2603.05630), on rFID's features and code path.
Every sum is a torchmetrics state, so DDP ranks give the figures of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdvae.latent_transforms import MIN_DECODED_SIDE, LatentTransform, resize
from sdvae.scoring.features import FID_RELIABLE_FROM, FeatureStats, frechet_distance, inception_features
from sdvae.scoring.protocol import psnr_per_image, to_uint8
from sdvae.scoring.stats import Moments

HIGH_FREQUENCY_FROM = 0.5  # of the Nyquist frequency, radially
IFID_ALPHA = 0.5  # halfway between a latent and its nearest neighbour

Decode = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # (latent, image size) -> image in [-1, 1]


def dct_matrix(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal DCT-II: `D @ v` are the coefficients of v, row k at k / (2n) cycles per sample."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def high_frequency_share(t: torch.Tensor, start: float = HIGH_FREQUENCY_FROM) -> torch.Tensor:
    """Per image of (N, C, H, W): the share of 2D DCT power (DC left out) whose radial frequency,
    in units of the Nyquist frequency, exceeds `start`; the mean over channels. NaN for a flat map."""
    h, w = t.shape[-2:]
    coeffs = dct_matrix(h, t.device) @ t.double() @ dct_matrix(w, t.device).T
    power = coeffs.pow(2)
    fy = torch.arange(h, dtype=torch.float64, device=t.device)[:, None] / h
    fx = torch.arange(w, dtype=torch.float64, device=t.device)[None, :] / w
    high = (fy.pow(2) + fx.pow(2)).sqrt() > start
    total = power.sum(dim=(-2, -1)) - power[..., 0, 0]
    share = (power * high).sum(dim=(-2, -1)) / total
    return share.mean(dim=1)


@dataclass
class DiffusabilityMetrics:
    """The running sums of one model; `compute()` is its `latent` section."""

    kid_max_images: int = 5000
    ifid_max_images: int = 5000
    scale_psnr: Moments = field(default_factory=Moments)
    scale_lpips: Moments = field(default_factory=Moments)
    rotation_psnr: Moments = field(default_factory=Moments)
    latent_high_frequency: Moments = field(default_factory=Moments)
    rgb_high_frequency: Moments = field(default_factory=Moments)
    interpolated: FeatureStats = field(init=False)
    latents: list[torch.Tensor] = field(default_factory=list)  # this rank's, for iFID
    index: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.interpolated = FeatureStats(self.kid_max_images)

    def to(self, device: torch.device) -> DiffusabilityMetrics:
        for name in ("scale_psnr", "scale_lpips", "rotation_psnr", "latent_high_frequency", "rgb_high_frequency"):
            getattr(self, name).to(device)
        self.interpolated.to(device)
        return self

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        index: torch.Tensor,
        decode: Decode,
        lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        """x: originals in [-1, 1]; z: their latents; `decode(z, size)` an image of that size;
        `lpips(a, b)` per-image distances of images in [-1, 1]."""
        (h, w), (zh, zw) = x.shape[-2:], z.shape[-2:]
        self.latent_high_frequency.update(high_frequency_share(z.float()))
        self.rgb_high_frequency.update(high_frequency_share(resize(x, (zh, zw))))
        keep = index < self.ifid_max_images
        if keep.any():
            self.latents.append(z[keep].float().cpu())
            self.index.append(index[keep].cpu())
        half = (zh // 2, zw // 2)
        if min(half) >= 1:
            scaled = LatentTransform(half)
            size = (round(h * half[0] / zh), round(w * half[1] / zw))
            target8, rec8 = to_uint8(scaled.image(x, size)), to_uint8(decode(scaled.latent(z), size))
            self.scale_psnr.update(psnr_per_image(target8, rec8))
            if min(size) >= MIN_DECODED_SIDE:  # LPIPS-VGG's four poolings need 16 px
                self.scale_lpips.update(lpips(_unit(target8), _unit(rec8)))
        turned = LatentTransform((zh, zw), quarter_turns=1)
        target8 = to_uint8(turned.image(x, (h, w)))
        self.rotation_psnr.update(psnr_per_image(target8, to_uint8(decode(turned.latent(z), (w, h)))))

    @torch.no_grad()
    def interpolate(
        self,
        everyone: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
        decode: Decode,
        image_size: tuple[int, int],
        inception: torch.nn.Module,
        batch_size: int,
        device: torch.device,
        alpha: float = IFID_ALPHA,
    ) -> None:
        """Decode this rank's latents moved `alpha` of the way to their nearest neighbour among
        every rank's (`everyone`: each rank's (latents, index) lists) and gather their features."""
        pool = [t for latents, _ in everyone for t in latents]
        pool_index = [t for _, index in everyone for t in index]
        if not self.latents or len(pool) == 0:
            return
        pool_z, pool_i = torch.cat(pool).to(device), torch.cat(pool_index).to(device)
        if pool_z.shape[0] < 2:
            return
        flat = pool_z.flatten(1).double()
        for mine, idx in zip(self.latents, self.index, strict=True):
            for z, i in zip(mine.to(device).split(batch_size), idx.to(device).split(batch_size), strict=True):
                dist = torch.cdist(z.flatten(1).double(), flat)
                dist[i[:, None] == pool_i[None, :]] = math.inf  # not itself
                neighbour = pool_z[dist.argmin(dim=1)]
                images = to_uint8(decode(torch.lerp(z, neighbour, alpha), image_size))
                self.interpolated.update(inception_features(inception, images), i)

    def compute(self, real_stats: dict[str, Any] | None, alpha: float = IFID_ALPHA) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scale_equivariance": {"psnr": self.scale_psnr.compute(), "lpips": self.scale_lpips.compute()},
            "rotation_equivariance": {"psnr": self.rotation_psnr.compute()},
            "spectrum": {
                "high_frequency_from": HIGH_FREQUENCY_FROM,
                "latent_high_frequency_share": self.latent_high_frequency.compute(),
                "rgb_high_frequency_share": self.rgb_high_frequency.compute(),
            },
        }
        if real_stats is None:  # the same on every rank: no collective is skipped on one alone
            out["ifid"] = {"value": None, "n": 0, "reliable": False, "alpha": alpha}
            out["ifid"]["why_none"] = "no Inception network in this run"
            return out
        fake = self.interpolated.compute()
        n = int(fake["n"])
        value = frechet_distance(real_stats, fake) if n >= 2 else None
        out["ifid"] = {"value": value, "n": n, "reliable": n >= FID_RELIABLE_FROM, "alpha": alpha}
        return out


def _unit(images8: torch.Tensor) -> torch.Tensor:
    return images8.float().div(127.5).sub(1.0)
