"""Building blocks of the KL autoencoder.

Module and parameter names follow `diffusers.AutoencoderKL` exactly (resnets, downsamplers.0.conv,
attentions.0.to_q, ...), so a state dict moves between the two with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_EPS = 1e-6


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Attention(nn.Module):
    """Single-head spatial self-attention of the mid block, through SDPA (flash/memory-efficient kernels)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C), layout as diffusers
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[1](self.to_out[0](out))
        # (out + x) keeps the memory layout diffusers produces, so convs after it round identically.
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) padding, as LDM and diffusers do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # nearest upsample has no bf16 kernel on some builds
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _CheckpointedStack(nn.Module):
    """Runs its resnets with optional activation checkpointing (trades compute for memory)."""

    gradient_checkpointing: bool = False

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)


class DownEncoderBlock2D(_CheckpointedStack):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = self._run(resnet, x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(_CheckpointedStack):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = self._run(resnet, x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(_CheckpointedStack):
    """resnet -> (attention -> resnet); attention can be switched off (`mid_block_add_attention`)."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.add_attention = add_attention
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run(self.resnets[0], x)
        if self.attentions[0] is not None:
            x = self._run(self.attentions[0], x)
        return self._run(self.resnets[1], x)


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        mid_attention: bool,
        double_z: bool = True,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        blocks, prev = [], block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            final = i == len(block_out_channels) - 1
            blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, groups, add_downsample=not final))
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        out = 2 * latent_channels if double_z else latent_channels
        self.conv_out = nn.Conv2d(block_out_channels[-1], out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, mid_attention)
        blocks, prev = [], rev[0]
        for i, ch in enumerate(rev):
            final = i == len(rev) - 1
            blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, groups, add_upsample=not final))
            prev = ch
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """Everything before `conv_out`. Kept apart so `conv_out`, whose weight the adaptive GAN
        weight differentiates, can stay outside a compiled region (see sdvae.training.compiling)."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_act(self.conv_norm_out(x))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.trunk(z))
