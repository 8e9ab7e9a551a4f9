"""The models a scoring run compares: VAEs from any supported file, and the bicubic baseline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdvae.baseline import bicubic_down, bicubic_up
from sdvae.formats import load_any
from sdvae.formats.diffusers import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from sdvae.io import sha256_file
from sdvae.models.autoencoder_kl import AutoencoderKL, pad_to_multiple

BICUBIC = "bicubic"


class UnusableModel(ValueError):
    """A model argument that cannot be loaded; the message is the one line shown to the user."""


@dataclass
class Candidate:
    label: str
    model: AutoencoderKL | None  # None: the bicubic baseline
    sha256: str | None
    source: str


def weights_file(path: Path) -> Path | None:
    """The file holding a model's weights (hashed so a table names exactly what it scored)."""
    if path.is_file():
        return path
    for folder in (path, path / "vae"):
        for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            if (folder / name).is_file():
                return folder / name
    return None


def _digest(path: Path | None) -> str | None:
    return None if path is None else sha256_file(path)


def load_candidate(spec: str, label: str | None = None) -> Candidate:
    """`bicubic`, a diffusers folder (or pipeline folder with vae/), or an LDM/SD single file."""
    if spec == BICUBIC:
        return Candidate(label or BICUBIC, None, None, BICUBIC)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UnusableModel(f"{spec}: no such model folder or file (or 'bicubic')")
    try:
        model = load_any(path)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnusableModel(f"{spec}: not a loadable AutoencoderKL ({type(exc).__name__}: {first[:300]})") from exc
    return Candidate(label or spec, model.eval().requires_grad_(False), _digest(weights_file(path)), spec)


class Reconstructor:
    """Encode-decode of one candidate on a batch in [-1, 1]; latents for the statistics."""

    def __init__(self, candidate: Candidate, bicubic_shape: tuple[int, int], sample_seed: int | None) -> None:
        self.candidate, self.bicubic_shape, self.sample_seed = candidate, bicubic_shape, sample_seed

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, latent); bicubic's latent is its small image."""
        model = self.candidate.model
        if model is None:
            small = bicubic_down(x, *self.bicubic_shape)
            return bicubic_up(small, (x.shape[-2], x.shape[-1])), small
        bf16 = precision == "bf16-mixed"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            h, w = x.shape[-2:]
            posterior = model.encode(pad_to_multiple(x, model.downsample_factor))
            z = posterior.mode() if self.sample_seed is None else self._sample(posterior.mean, posterior.std, index)
            rec = model.decode(z)[..., :h, :w]
        return rec.float(), z.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, size: tuple[int, int], precision: str) -> torch.Tensor:
        """An image of `size` from a latent (or a transformed one): the VAE's decoder, whose output
        size the latent fixes, or bicubic's upscale to `size`."""
        model = self.candidate.model
        if model is None:
            return bicubic_up(z, size)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            rec = model.decode(z)
        if tuple(rec.shape[-2:]) != tuple(size):
            raise ValueError(f"decoded {tuple(rec.shape[-2:])}, expected {tuple(size)}")
        return rec.float()

    def _sample(self, mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Posterior samples seeded per image, so sharding across ranks does not change them."""
        seed = int(self.sample_seed or 0) * 1_000_003
        generators = [torch.Generator().manual_seed(seed + int(i)) for i in index]
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        return mean + std * noise.to(mean)
