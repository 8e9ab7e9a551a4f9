"""Weight initialisation schemes for training from scratch.

PyTorch's default conv init (kaiming-uniform with a=sqrt(5)) shrinks activations by about
sqrt(3) per layer, so the plain strided-conv path through encoder and decoder starts near zero
and the deep autoencoder sits on a long plateau. `scaled_residual` makes every conv and linear
variance-preserving (normal, std = 1/sqrt(fan_in), zero bias) and zeroes the last layer of every
residual branch (ResNet conv2, attention output), so training starts from a short, well-scaled
path and adds depth as the branches learn (zero-init residuals: Goyal et al. 2017; Fixup).
The architecture and parameter layout are unchanged; only starting values differ.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.models.blocks import Attention, ResnetBlock2D

InitScheme = Literal["pytorch", "scaled_residual"]


def initialize(model: nn.Module, scheme: InitScheme) -> nn.Module:
    """Re-initialise `model` in place; "pytorch" keeps the constructor's values."""
    if scheme == "pytorch":
        return model
    if scheme != "scaled_residual":
        raise ValueError(f"unknown init scheme {scheme!r}; allowed: pytorch, scaled_residual")
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=fan_in**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)
        elif isinstance(module, Attention):
            nn.init.zeros_(module.to_out[0].weight)
            nn.init.zeros_(module.to_out[0].bias)
    return model


def set_posterior_logvar(model: AutoencoderKL, logvar: float) -> AutoencoderKL:
    """Start the posterior's log-variance near `logvar` for every input.

    Why: with a zero bias the fresh encoder's posterior has unit variance while its means are
    small, so the sampled latents are mostly noise and the decoder first learns to ignore them;
    a negative start lets reconstruction drive learning from step one (the KL term still pulls
    the variance up where the latent does not need the precision). The logvar half of the
    moment-producing conv (`quant_conv`, else the encoder's `conv_out`) gets this bias and
    weights scaled down 100x, so the start does not depend on the input.
    """
    conv = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].mul_(0.01)
        conv.bias[half:].fill_(logvar)
    return model
