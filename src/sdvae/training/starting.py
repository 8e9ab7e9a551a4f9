"""The autoencoder a run starts from: built from the preset, or loaded from `train.init_from`.

One function for training and `sdvae info`, so both time (and look up timings for) the same
architecture: an `init_from` run's workload is the loaded model's, not the preset's.
"""

from __future__ import annotations

from pathlib import Path

from sdvae.config import Config
from sdvae.formats import load_any
from sdvae.formats.ldm import carries_factors
from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.models.factory import build_autoencoder, with_family_factors


def starting_autoencoder(cfg: Config) -> AutoencoderKL:
    if not cfg.train.init_from:
        return build_autoencoder(cfg.model, cfg.train.resolution)
    autoencoder = load_any(cfg.train.init_from)  # a diffusers folder, or a single LDM/SD/FLUX file
    if Path(cfg.train.init_from).is_file() and not carries_factors(cfg.train.init_from):
        # a file from elsewhere: its family's factors (files we write carry their own)
        autoencoder.config = with_family_factors(autoencoder.config, cfg.model, cfg.train.init_from)
    autoencoder.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return autoencoder
