"""Times the real training step, per precision and per phase of the schedule.

The step is the trainer's own: the autoencoder forward with a posterior sample, `VAEGANLoss`
(pixel, LPIPS, KL, and in the GAN phase the discriminator term with the one-backward adaptive
weight), the generator backward and AdamW step, then in the GAN phase the discriminator step.
It runs on copies, so the model being trained is untouched. Variants are interleaved after a
warm-up, so drift in machine load hits all alike; each time is the median of its rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn

from sdvae.config import Config
from sdvae.losses import VAEGANLoss
from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.models.discriminator import NLayerDiscriminator
from sdvae.training.latent_refine import refine_latents, refine_loss

PHASES = ("pixel", "perceptual", "gan")  # before perceptual_start, before disc_start, after
AUTOCAST_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    cfg: Config, autoencoder: AutoencoderKL, perceptual: nn.Module | None, batch: torch.Tensor
) -> Callable[[str, str], None]:
    """`step(precision, phase)`: one training window of that phase, on copies of the networks."""
    ae = copy.deepcopy(autoencoder).train()
    d = cfg.discriminator
    disc = NLayerDiscriminator(ae.config.out_channels, d.ndf, d.n_layers, d.norm).to(batch.device)
    loss = VAEGANLoss(cfg.loss, perceptual).to(batch.device)
    opt_g = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-6)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-6)
    last = ae.decoder.conv_out.weight
    refine = cfg.loss.refine_steps

    def step(precision: str, phase: str) -> None:
        dtype = AUTOCAST_DTYPES[precision]
        autocast = torch.autocast(batch.device.type, dtype) if dtype is not None else nullcontext()
        gan = phase == "gan"
        with autocast:
            disc.requires_grad_(False)
            xrec, posterior = ae(batch, sample_posterior=True)
            logits = disc(xrec) if gan else None
            terms = loss.generator(batch, xrec, posterior, logits, last if gan else None, phase != "pixel")
            backward = terms.backward
            if refine:  # semi-amortised encoding: its inner decodes are part of the step
                target = refine_latents(ae.decode, posterior.mean, batch, refine, cfg.loss.refine_lr)
                backward = backward + refine_loss(posterior.mean, target, batch[0].numel())
            backward.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if gan:
            disc.requires_grad_(True)
            with autocast:
                d_loss, _ = loss.discriminator(disc(batch), disc(xrec.detach()))
                d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    return step


# A variant whose warm-up step takes this many times the fastest of its phase is not timed further:
# bf16 without native support (AVX2-only CPUs) ran ~25x slower than fp32, and its rounds alone
# cost minutes of every run's start; a one-time first-call overhead stays far below this.
HOPELESS_FACTOR = 8.0


def time_step_variants(
    step: Callable[[str, str], None],
    variants: Iterable[tuple[str, str]],
    device: torch.device,
    rounds: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Median seconds per step: {precision: {phase: seconds}}, variants interleaved. A variant
    `HOPELESS_FACTOR` x slower in the warm-up than the fastest of its phase keeps its warm-up
    time (it cannot win) instead of running its rounds."""
    variants = list(variants)
    samples: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    first: dict[tuple[str, str], float] = {}
    active = list(variants)
    for r in range(warmup + rounds):
        for v in active:
            _sync(device)
            t0 = time.perf_counter()
            step(*v)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                samples[v].append(elapsed)
            elif r == warmup - 1:
                first[v] = elapsed
        if r == warmup - 1:  # against the fastest precision of the same phase
            fastest = {ph: min(t for (_, p), t in first.items() if p == ph) for _, ph in first}
            active = [v for v in active if first[v] <= HOPELESS_FACTOR * fastest[v[1]]]
    out: dict[str, dict[str, float]] = {}
    for (precision, phase), times in samples.items():
        out.setdefault(precision, {})[phase] = round(statistics.median(times or [first[(precision, phase)]]), 6)
    return out


def phases_in_run(cfg: Config) -> list[str]:
    """The phases a run of `cfg` goes through (only those are worth timing)."""
    phases = []
    if cfg.loss.perceptual_start > 0 or cfg.loss.perceptual_weight <= 0:
        phases.append("pixel")
    if cfg.loss.perceptual_weight > 0:
        phases.append("perceptual")
    if cfg.loss.disc_factor > 0:
        phases.append("gan")
    return phases


def measure(
    cfg: Config,
    autoencoder: AutoencoderKL,
    perceptual: nn.Module | None,
    precisions: Iterable[str],
    device: torch.device,
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """Seconds per training step of each phase the run has, in each precision, on `device`."""
    gen = torch.Generator().manual_seed(0)
    res = cfg.train.resolution
    batch = (torch.rand(cfg.train.batch_size, 3, res, res, generator=gen) * 2 - 1).to(device)
    step = make_step(cfg, autoencoder.to(device), perceptual.to(device) if perceptual is not None else None, batch)
    return time_step_variants(step, [(p, ph) for p in precisions for ph in phases_in_run(cfg)], device, rounds)
