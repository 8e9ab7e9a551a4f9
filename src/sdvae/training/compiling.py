"""`train.compile`: torch.compile of the networks in the training step, leaving their layout alone.

What is compiled: the encoder, the decoder up to (not including) `conv_out`, the discriminator
and LPIPS. `conv_out` stays eager on purpose: the adaptive GAN weight differentiates its weight,
and inside a compiled region that gradient would cost the whole decoder's compiled backward.
`nn.Module.compile` compiles in place, so state-dict keys (checkpoints, exports, EMA) are
unchanged. The EMA copy is not compiled: it only runs in validation.
"""

from __future__ import annotations

import torch
from torch import nn

from sdvae.models.autoencoder_kl import AutoencoderKL


def compile_for_training(
    autoencoder: AutoencoderKL, discriminator: nn.Module, perceptual: nn.Module | None, mode: str
) -> None:
    autoencoder.encoder.compile(mode=mode)
    decoder = autoencoder.decoder
    decoder.trunk = torch.compile(decoder.trunk, mode=mode)  # type: ignore[method-assign]
    discriminator.compile(mode=mode)
    if perceptual is not None:
        perceptual.compile(mode=mode)
