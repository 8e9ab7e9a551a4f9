"""Paths shared by the stage scripts (wiring only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdvae.config import Config, WeightsConfig

PIPELINE_VGG = Path("data/weights/lpips_vgg16.safetensors")
PIPELINE_INCEPTION = Path("data/weights/fid_inception.pth")


def pipeline_weights(cfg: Config) -> WeightsConfig:
    """The weights stage's tracked outputs; explicit params still win."""
    return dataclasses.replace(
        cfg.weights,
        lpips_vgg=cfg.weights.lpips_vgg or str(PIPELINE_VGG),
        inception=cfg.weights.inception or str(PIPELINE_INCEPTION),
    )


def trained_autoencoder(cfg: Config) -> tuple[Path, str]:
    """(folder, "ema" | "raw"): the EMA weights when enabled and present, as validation used."""
    ema = Path("models/train/vae_ema")
    if cfg.eval.use_ema and ema.is_dir():
        return ema, "ema"
    return Path("models/train/vae"), "raw"


def pipeline_config(cfg: Config) -> Config:
    return dataclasses.replace(cfg, weights=pipeline_weights(cfg))
