"""LPIPS against one reference batch for many models: the originals' VGG features once.

Scoring K models costs K + 1 VGG passes per batch instead of 2K. The arithmetic is the lpips
package's own (v0.1: scaling layer, unit-normalised features, learned linear heads, spatial
mean), applied through its modules, so distances equal `lpips_net(x, y)` (tested).
"""

from __future__ import annotations

import lpips
import torch
from torch import nn


class ReferenceLPIPS:
    """`distances(rec)` = lpips_net(reference, rec) per image, for inputs in [-1, 1]."""

    def __init__(self, lpips_net: nn.Module) -> None:
        if getattr(lpips_net, "version", "0.1") != "0.1" or getattr(lpips_net, "spatial", False):
            raise ValueError("ReferenceLPIPS expects LPIPS v0.1 with spatial=False")
        self.net = lpips_net
        self.reference: list[torch.Tensor] = []

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.net.net.forward(self.net.scaling_layer(x))
        return [lpips.normalize_tensor(o) for o in outs]

    @torch.no_grad()
    def set_reference(self, x: torch.Tensor) -> None:
        self.reference = self._features(x.float())

    @torch.no_grad()
    def distances(self, rec: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(rec.shape[0], device=rec.device)
        for lin, ref, feat in zip(self.net.lins, self.reference, self._features(rec.float()), strict=True):
            total = total + lin((ref - feat) ** 2).mean(dim=(2, 3)).flatten()
        return total
