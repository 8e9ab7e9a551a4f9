"""The autoencoder's architecture as data: its config (diffusers' keys) and the named presets.

A leaf module (no torch, no sdvae imports) so that params validation (`sdvae.config`) and the
models can both read the presets' geometry while imports run one way: config -> architectures,
models -> config, models -> architectures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of the autoencoder; field names are diffusers' config keys."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # optional per-channel statistics (SDXL/SD3 style)
    latents_std: tuple[float, ...] | None = None
    sample_size: int = 256
    force_upcast: bool = True

    def __post_init__(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {list(self.block_out_channels)}: every width must be divisible by "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm); {bad} are not"
            )
        if self.latent_channels < 1 or not self.block_out_channels:
            raise ValueError("latent_channels must be >= 1 and block_out_channels non-empty")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes: Any) -> AutoencoderKLConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, AutoencoderKLConfig] = {
    # CPU default: f8c4 geometry like SD, narrow widths (about 3.6 M parameters).
    "tiny": AutoencoderKLConfig(
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16, sample_size=64
    ),
    # Stable Diffusion 1.x/2.x VAE (sd-vae-ft-mse): 83,653,863 parameters.
    "sd-f8c4": AutoencoderKLConfig(),
    # CompVis configs/autoencoder/autoencoder_kl_64x64x3.yaml (kl-f4): 55,312,063 parameters.
    "ldm-kl-f4": AutoencoderKLConfig(block_out_channels=(128, 256, 512), latent_channels=3),
    # The published diffusers configs of the VAEs diffusion models use today (their vae/config.json):
    # SDXL: SD's layout, its own latent scale; decodes in fp16 only after its fp16-fix fine-tune.
    "sdxl-f8c4": AutoencoderKLConfig(scaling_factor=0.13025, sample_size=1024, force_upcast=True),
    # SD3 and FLUX.1: 16 latent channels, no quant convs, a shift as well as a scale.
    "sd3-f8c16": AutoencoderKLConfig(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        sample_size=1024,
    ),
    "flux-f8c16": AutoencoderKLConfig(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        sample_size=1024,
    ),
}
