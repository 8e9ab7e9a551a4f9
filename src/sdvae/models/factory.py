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


_LAYOUT = ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv", "use_post_quant_conv")


def with_family_factors(loaded: AutoencoderKLConfig, cfg: ModelConfig, source: str) -> AutoencoderKLConfig:
    """A single-file checkpoint (LDM/SD, BFL's ae.safetensors) carries no latent factors; they come
    from the family `model.preset` names, which must have the file's layout (16-channel SD3 and
    FLUX files differ only in their factors), and explicit `model.scaling_factor` /
    `model.shift_factor` win. Without this a decoder-only fine-tune of FLUX's VAE would ship
    SD's 0.18215 and break the diffusion model it was made for."""
    preset = architecture(cfg)  # the family's preset with the model.* overrides (tiny stand-ins in tests)
    mismatched = [k for k in _LAYOUT if getattr(preset, k) != getattr(loaded, k)]
    if mismatched:
        found = ", ".join(f"{k}={getattr(loaded, k)}" for k in mismatched)
        raise ConfigError(
            f"train.init_from {source}: a single file has no scaling/shift factors, so model.preset names its "
            f"family, but preset {cfg.preset!r} (with model.* overrides) differs in {found}; set model.preset "
            "to the file's family (sd-f8c4, sdxl-f8c4, sd3-f8c16, flux-f8c16) or init from a diffusers folder"
        )
    factors = {"scaling_factor": preset.scaling_factor, "shift_factor": preset.shift_factor}
    factors["force_upcast"] = preset.force_upcast
    for key in ("scaling_factor", "shift_factor"):
        if getattr(cfg, key) is not None:
            factors[key] = getattr(cfg, key)
    return loaded.replace(**factors)
