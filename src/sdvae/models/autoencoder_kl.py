"""KL-regularised autoencoder (the latent-diffusion "first stage"), diffusers-compatible.

State dicts are interchangeable with `diffusers.AutoencoderKL` (strict); the class adds the
memory features training and inference at large sizes need: activation checkpointing,
batch slicing and overlapping tiles, plus padding for sides that are not multiples of the
downsampling factor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sdvae.architectures import PRESETS, AutoencoderKLConfig  # the models' public names too
from sdvae.models.blocks import Decoder, Encoder, _CheckpointedStack
from sdvae.models.tiling import tiled_apply


class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) over latents; logvar clamped to [-30, 20] for stability."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False) -> None:
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)), summed over latent elements: one value per sample."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log2pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=(1, 2, 3))


class ModelFiles(Protocol):
    """How models reach disk; provided by `sdvae.formats`."""

    def load(self, path: Path) -> AutoencoderKL: ...

    def save(self, model: AutoencoderKL, path: Path) -> Path: ...


_FILES: list[ModelFiles] = []


def register_model_files(files: ModelFiles) -> None:
    _FILES[:] = [files]


def _model_files() -> ModelFiles:
    if not _FILES:  # only if sdvae.formats was never imported, which importing sdvae does
        raise RuntimeError("no model file formats registered: import sdvae.formats")
    return _FILES[0]


class AutoencoderKL(nn.Module):
    """Encoder -> diagonal Gaussian latent -> decoder, with diffusers' parameter layout."""

    def __init__(self, config: AutoencoderKLConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = (
            (config or AutoencoderKLConfig()).replace(**overrides) if overrides else (config or AutoencoderKLConfig())
        )
        self.config = config
        c = config
        self.encoder = Encoder(
            c.in_channels,
            c.latent_channels,
            c.block_out_channels,
            c.layers_per_block,
            c.norm_num_groups,
            c.mid_block_add_attention,
            double_z=True,
        )
        self.decoder = Decoder(
            c.latent_channels,
            c.out_channels,
            c.block_out_channels,
            c.layers_per_block,
            c.norm_num_groups,
            c.mid_block_add_attention,
        )
        z2 = 2 * c.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.max_batch_size: int | None = None  # slice batches larger than this
        self.tile_size: int | None = None  # pixels; tile images whose side exceeds it
        self.tile_overlap: float = 0.25

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AutoencoderKL:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(PRESETS[name], **overrides)

    # diffusers' spelling, for users' first line. Files are `sdvae.formats`' business, which
    # registers its reader and writer here (`register_model_files`) when `sdvae` is imported: the
    # models never import the formats, so imports run one way.
    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> AutoencoderKL:
        """A diffusers folder (or pipeline folder with vae/), or an LDM/SD single file."""
        return _model_files().load(Path(path) / subfolder if subfolder else Path(path))

    def save_pretrained(self, path: str | Path) -> Path:
        """A diffusers folder that `diffusers.AutoencoderKL.from_pretrained` loads."""
        return _model_files().save(self, Path(path))

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, _CheckpointedStack):
                m.gradient_checkpointing = enabled

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # -- core -----------------------------------------------------------------------------------------
    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _sliced(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        n = self.max_batch_size
        if n is None or x.shape[0] <= n:
            return fn(x)
        return torch.cat([fn(chunk) for chunk in x.split(n)], dim=0)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if self.tile_size is not None and max(x.shape[-2:]) > self.tile_size:
            return tiled_apply(self._encode_moments, x, self.tile_size, self.tile_overlap, 1 / f, f)
        return self._encode_moments(x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior over latents; sides must be multiples of `downsample_factor` (see `reconstruct`)."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"input sides {tuple(x.shape[-2:])} must be multiples of {f}; "
                "use reconstruct() or pad_to_multiple() for arbitrary sizes"
            )
        return DiagonalGaussianDistribution(self._sliced(self._moments, x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        latent_tile = None if self.tile_size is None else max(1, self.tile_size // f)

        def run(zz: torch.Tensor) -> torch.Tensor:
            if latent_tile is not None and max(zz.shape[-2:]) > latent_tile:
                return tiled_apply(self._decode_latents, zz, latent_tile, self.tile_overlap, f, 1)
            return self._decode_latents(zz)

        return self._sliced(run, z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # -- latent API used by diffusion models ------------------------------------------------------------
    def encode_to_latent(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Latent in diffusion space: (z - shift) * scaling_factor."""
        post = self.encode(x)
        z = post.sample() if sample else post.mode()
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def decode_from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift_factor or 0.0
        return self.decode(latent / self.config.scaling_factor + shift)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction of any-size images in [-1, 1] (pads, then crops back)."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.downsample_factor)
        return self.decode(self.encode(padded).mode())[..., :h, :w]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right so both sides are multiples of `multiple` (replicate if too small)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
