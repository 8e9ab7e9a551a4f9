"""Latent factors: make diffusion latents zero-mean, unit-variance instead of copying 0.18215.

0.18215 is 1/std of *SD's* latents; a retrained VAE has its own. We estimate it the way LDM's
`scale_by_std` does, on posterior samples over a sample of images, plus per-channel statistics.
SD3 and FLUX also shift: `(z - shift_factor) * scaling_factor`, with the shift the latents' mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sdvae.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig


@torch.no_grad()
def latent_statistics(
    model: AutoencoderKL, batches: Iterable[torch.Tensor], seed: int = 0, device: str | torch.device = "cpu"
) -> dict[str, object]:
    """1/std over all latent values (`scaling_factor`), global mean, per-channel mean/std."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total = total_sq = 0.0
    count = 0
    ch_sum = ch_sq = None
    ch_count = 0
    images = 0
    model = model.to(device).eval()
    for x in batches:
        z = model.encode(x.to(device)).sample(gen).double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
        s, sq = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
        ch_sum = s if ch_sum is None else ch_sum + s
        ch_sq = sq if ch_sq is None else ch_sq + sq
        ch_count += z.shape[0] * z.shape[2] * z.shape[3]
        images += z.shape[0]
    if count == 0 or ch_sum is None or ch_sq is None:
        raise ValueError("latent_statistics needs at least one batch")
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    ch_mean = ch_sum / ch_count
    ch_std = (ch_sq / ch_count - ch_mean.pow(2)).clamp_min(0).sqrt()
    return {
        "scaling_factor": 1.0 / std,
        "shift_factor": mean,  # SD3 / FLUX's shift; 1/std is the scale after it as before it
        "mean": mean,
        "std": std,
        "images": images,
        "channel_mean": ch_mean.tolist(),
        "channel_std": ch_std.tolist(),
    }


def shipped_factors(
    config: AutoencoderKLConfig, stats: dict[str, object], encoder_trained: bool
) -> tuple[AutoencoderKLConfig, str]:
    """The config to ship and why. A decoder-only fine-tune keeps the encoder, so the latent space
    the diffusion model was trained on, and with it the model's own `scaling_factor`,
    `shift_factor` and `force_upcast`: recomputing them on a small domain set would silently
    break that diffusion model. Otherwise both factors measured on the training crops replace the
    old ones; a shift only for families that use one (SD3, FLUX): SD and SDXL pipelines read
    `scaling_factor` alone, so a shift there would be ignored and its scale off-centre."""
    if not encoder_trained:
        return config, "kept: decoder-only fine-tune, the encoder and its latent space are unchanged"
    if not stats:
        return config, "kept: export.compute_scaling_factor is false"
    shift = None if config.shift_factor is None else float(stats["shift_factor"])
    note = "computed: 1/std of posterior samples" + (", shift their mean" if shift is not None else "")
    return config.replace(scaling_factor=float(stats["scaling_factor"]), shift_factor=shift), note
