"""Typed `model` params -> an AutoencoderKL (preset plus explicit overrides)."""

from __future__ import annotations

from typing import Any

from sdvae.config import ConfigError, ModelConfig
from sdvae.models.autoencoder_kl import PRESETS, AutoencoderKL, AutoencoderKLConfig
from sdvae.models.init import initialize, set_posterior_logvar

_OVERRIDABLE = {
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "latent_channels": "latent_channels",
    "norm_num_groups": "norm_num_groups",
    "mid_block_attention": "mid_block_add_attention",
    "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
}


def architecture(cfg: ModelConfig, sample_size: int | None = None) -> AutoencoderKLConfig:
    """The preset with every non-null override applied; errors name the `model.*` key."""
    overrides: dict[str, Any] = {
        ours: getattr(cfg, key) for key, ours in _OVERRIDABLE.items() if getattr(cfg, key) is not None
    }
    if sample_size is not None:
        overrides["sample_size"] = sample_size
    try:
        return PRESETS[cfg.preset].replace(**overrides)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc


def build_autoencoder(cfg: ModelConfig, sample_size: int | None = None) -> AutoencoderKL:
    model = initialize(AutoencoderKL(architecture(cfg, sample_size)), cfg.init)
    if cfg.init_logvar is not None:
        set_posterior_logvar(model, cfg.init_logvar)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    return model
