"""`loss.refine_steps`: semi-amortised encoding, the encoder pulled towards latents refined for
its own batch.

Why: on the unseen photos, latents fitted to each image by gradient descent through the decoder
lie only 0.16-0.44 latent std from the encoder's and decode about 3 dB better (flat fields 21-29
dB encoded, 33.5-41 dB fitted; docs/quality.md, latent inversion): the encoder's aim, not the
decoder, sets most of the error floor. A few cheap inner steps find where the decoder wants each
latent now; the encoder then gets a loss towards that point (Kim et al. 2018 backpropagate
through the steps; here the refined latent is a fixed target, so the cost is only the inner
decodes). The decoder's own loss stays on the encoder's sample: inference decodes that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdvae.training.latent_noise import channel_spread


def refine_latents(
    decode: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, x: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """`z0` moved by `steps` Adam steps on each image's pixel MSE through `decode` (detached).
    The step is taken in units of the batch's per-channel latent std, so `lr` reads as "latent
    stds per step" whatever the latent scale; only the latent gets gradients, never the decoder's
    weights."""
    start = z0.detach().float()
    spread = channel_spread(start).clamp_min(1e-6)
    offset = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=lr)
    target = x.detach().float()
    for _ in range(steps):
        z = start + spread * offset
        loss = (decode(z).float() - target).pow(2).mean(dim=(1, 2, 3)).sum()
        (grad,) = torch.autograd.grad(loss, offset)
        offset.grad = grad
        opt.step()
    return (start + spread * offset).detach()


def refine_loss(mean: torch.Tensor, refined: torch.Tensor, values_per_sample: int) -> torch.Tensor:
    """Squared distance of the encoder's mean to the refined latent, in latent stds, averaged over
    latent elements and scaled to a per-sample sum over `values_per_sample` pixel values: the
    reconstruction term's scale, so `loss.refine_weight` 1 weighs a 1-std miss like a pixel error
    of 1 on every value."""
    spread = channel_spread(refined).clamp_min(1e-6)
    return ((mean.float() - refined.float()) / spread).pow(2).mean() * values_per_sample
