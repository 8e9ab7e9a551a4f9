"""Models: the KL autoencoder and the PatchGAN discriminator. They know nothing of Lightning."""

from sdvae.models.autoencoder_kl import (
    PRESETS,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    count_parameters,
    pad_to_multiple,
)
from sdvae.models.discriminator import NLayerDiscriminator

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussianDistribution",
    "NLayerDiscriminator",
    "count_parameters",
    "pad_to_multiple",
]
