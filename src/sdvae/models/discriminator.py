"""PatchGAN discriminator (pix2pix NLayerDiscriminator), the one LDM and SD VAEs train against."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

NormType = Literal["batch", "group", "spectral", "spectral_group", "none"]
NORM_TYPES: tuple[str, ...] = ("batch", "group", "spectral", "spectral_group", "none")


def _norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "batch":
        return nn.BatchNorm2d(channels)
    if norm_type in ("group", "spectral_group"):
        # GroupNorm keeps small per-device batches stable where BatchNorm statistics are noise.
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """Outputs a logit map: each value judges one receptive-field patch as real or fake."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm_type: str = "batch") -> None:
        super().__init__()
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type {norm_type!r}; allowed: {', '.join(NORM_TYPES)}")
        spectral = norm_type.startswith("spectral")
        use_bias = norm_type != "batch"

        def conv(cin: int, cout: int, stride: int, bias: bool = True) -> nn.Module:
            layer = nn.Conv2d(cin, cout, kernel_size=4, stride=stride, padding=1, bias=bias)
            return spectral_norm(layer) if spectral else layer

        layers: list[nn.Module] = [conv(input_nc, ndf, 2), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                conv(ndf * prev, ndf * mult, stride, use_bias),
                _norm_layer(norm_type, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(conv(ndf * mult, 1, 1))
        self.main = nn.Sequential(*layers)
        self.norm_type = norm_type
        if not spectral:
            self.apply(_init_weights)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """N(0, 0.02) convs and N(1, 0.02) norm scales (pix2pix/LDM init)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
