"""`loss.latent_noise`: the decoder is trained on latents perturbed around the encoder's aim.

Why: fitted latents only 0.16-0.44 latent std away from the encoder's decode the unseen photos
about 3 dB better (docs/quality.md, latent inversion): the decoder amplifies small misses of the
encoder. Decoders trained on noised latents (l-DeTok, representation-autoencoder decoders) learn
to map a neighbourhood of each latent to the same image. Each sample gets its own noise scale,
drawn uniformly from [0, `max_scale`], in units of the batch's per-channel latent std (detached,
so the noise follows the latent space as it grows or shrinks and is not itself learned), so
part of every batch is decoded nearly clean.
"""

from __future__ import annotations

import torch


def channel_spread(z: torch.Tensor) -> torch.Tensor:
    """Each latent channel's std over the batch and positions (N=1, C, 1, 1), in float32."""
    return z.detach().float().std(dim=(0, 2, 3), keepdim=True, unbiased=False)


def perturb_latents(z: torch.Tensor, max_scale: float) -> torch.Tensor:
    """`z` plus Gaussian noise of std `sigma_i x std_c` (sigma_i ~ U(0, max_scale) per sample,
    std_c the channel's std over the batch); `z` itself when `max_scale` is 0."""
    if max_scale <= 0:
        return z
    with torch.no_grad():
        spread = channel_spread(z).to(z.dtype)
        sigma = torch.rand(z.shape[0], 1, 1, 1, device=z.device, dtype=z.dtype) * max_scale
    return z + sigma * spread * torch.randn_like(z)
