"""Perceptual networks built on resolved pretrained weights: LPIPS (loss and metric) and FID."""

from __future__ import annotations

from pathlib import Path

import lpips
import torch
from torch import nn

from sdvae.config import WeightsConfig
from sdvae.pretrained import load_vgg16_features, resolve_inception, resolve_vgg16


def build_lpips(weights: WeightsConfig | None = None) -> nn.Module:
    """LPIPS-VGG with the real backbone; frozen, but gradients flow to its inputs (usable as a loss).

    `lpips.LPIPS(pretrained=True)` loads the linear heads shipped in the lpips wheel;
    `pnet_rand=True` stops it downloading torchvision's VGG, whose weights we load instead.
    """
    weights = weights or WeightsConfig()
    path = resolve_vgg16(weights.lpips_vgg, weights.cache_dir)
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    features = load_vgg16_features(path)
    slices = {str(i): name for name, mod in model.net.named_children() for i in mod._modules}
    state = {f"{slices[k.split('.')[0]]}.{k}": v for k, v in features.items()}
    model.net.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model


def inception_weights(weights: WeightsConfig | None = None) -> Path:
    weights = weights or WeightsConfig()
    return resolve_inception(weights.inception, weights.cache_dir)


def build_fid(weights: WeightsConfig | None = None) -> nn.Module:
    """torchmetrics FID (2048-d pool3) on the converted Inception; kept in fp32."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(inception_weights(weights))
    )


def lpips_distance(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS for inputs in [-1, 1]; shape (N,)."""
    return model(a, b, normalize=False).flatten()
