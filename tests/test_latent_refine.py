"""Semi-amortised encoding (`loss.refine_steps`): the refined latents and the encoder's loss."""

from __future__ import annotations

import pytest
import torch

from sdvae.training.latent_refine import refine_latents, refine_loss


def _decoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Upsample(scale_factor=2),
        torch.nn.Conv2d(16, 3, 3, padding=1),
    )


def _mse(decode, z, x) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return (decode(z) - x).pow(2).mean(dim=(1, 2, 3))


def test_refined_latents_decode_closer_to_every_image_without_touching_the_decoder():
    decode = _decoder()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    z0 = torch.randn(4, 4, 8, 8)
    refined = refine_latents(decode, z0, x, steps=5, lr=0.05)
    assert not refined.requires_grad
    assert (_mse(decode, refined, x) < _mse(decode, z0, x)).all()  # each image on its own
    assert all(p.grad is None for p in decode.parameters())


def test_each_step_moves_a_latent_at_most_lr_channel_stds():
    decode = _decoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    scale = torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    z0 = torch.randn(2, 4, 8, 8) * scale
    steps, lr = 3, 0.05
    moved = (refine_latents(decode, z0, x, steps, lr) - z0).abs().amax(dim=(0, 2, 3))
    spread = z0.std(dim=(0, 2, 3), unbiased=False)
    # Adam's step is at most ~lr per element (in units of the channel's spread): at most steps x lr
    assert (moved <= steps * lr * spread * 1.01).all(), moved / spread
    assert (moved >= 0.5 * lr * spread).all()  # and every channel did move


def test_refine_loss_is_zero_at_the_target_and_scales_with_the_pixels_per_sample():
    refined = torch.randn(2, 4, 8, 8)
    assert float(refine_loss(refined, refined, 12288)) == 0.0
    spread = refined.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    one_std_off = refined + spread  # every element a whole latent std away
    assert float(refine_loss(one_std_off, refined, 12288)) == pytest.approx(12288, rel=1e-5)
    mean = refined.clone().requires_grad_(True)
    refine_loss(mean + 0.1 * spread, refined, 100).backward()
    assert mean.grad is not None and (mean.grad > 0).all()  # pulls the encoder's mean back to the target
