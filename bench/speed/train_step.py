"""The VAE-GAN training step, ours against diffusers.AutoencoderKL, with each speed option.

The step is the one the trainer runs after `disc_start`: encoder + decoder forward, L1 + LPIPS
NLL, KL, the hinge GAN term weighted by the adaptive weight at the decoder's last layer, the
generator backward and AdamW step, then the discriminator step. The reference is diffusers'
AutoencoderKL driven the way the reference trainers do it (LDM, diffusers' example trainer):
the adaptive weight by two `autograd.grad` calls, then the full backward. Both start from the
same weights; variants run interleaved so drift in machine load hits all alike.

Variants:
- `diffusers`: the reference, eager.
- `diffusers_compiled`: the same with the VAE, discriminator and LPIPS under torch.compile.
- `ours_reference`: our model driven exactly like the reference (model parity).
- `ours_one_backward`: our adaptive weight with one backward through LPIPS and the discriminator.
- `ours_compiled`: one backward plus `train.compile` (sdvae.training.compiling).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from sdvae.losses import adaptive_gan_weight, hinge_d_loss, one_backward_gan_surrogate
from sdvae.models import AutoencoderKL, NLayerDiscriminator
from sdvae.training.compiling import compile_for_training

KL_WEIGHT, DISC_WEIGHT, MAX_WEIGHT = 1e-6, 0.5, 1e4
VARIANTS = ("diffusers", "ours_reference", "ours_one_backward", "ours_compiled", "diffusers_compiled")


def twin_models(preset: str, **overrides: object) -> tuple[AutoencoderKL, nn.Module]:
    """Ours and diffusers' AutoencoderKL with the same config and the same weights."""
    import diffusers

    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset(preset, **overrides)
    c = ours.config
    theirs = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * len(c.block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(c.block_out_channels),
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
    )
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_step(
    ae: nn.Module,
    is_diffusers: bool,
    lpips_net: nn.Module,
    batch: torch.Tensor,
    *,
    one_backward: bool,
    gan: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Callable[[], None], nn.Module]:
    """One full training step (G then D) as a closure, and its discriminator."""
    disc = NLayerDiscriminator(3, 64 if batch.shape[-1] >= 128 else 32, 3, "group").to(batch.device)
    fused = {"fused": True} if batch.is_cuda else {}
    opt_g = torch.optim.AdamW(ae.parameters(), lr=1e-4, betas=(0.5, 0.9), **fused)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), **fused)
    last = ae.decoder.conv_out.weight
    device_type = batch.device.type
    autocast = (lambda: torch.autocast(device_type, autocast_dtype)) if autocast_dtype else nullcontext

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        if is_diffusers:
            post = ae.encode(batch).latent_dist
            return ae.decode(post.sample()).sample, post.kl().sum() / batch.shape[0]
        rec, post = ae(batch)
        return rec, post.kl().sum() / batch.shape[0]

    def step() -> None:
        with autocast():
            disc.requires_grad_(False)
            rec, kl = forward()
            per_pixel = (batch.float() - rec.float()).abs() + lpips_net(batch.float(), rec.float())
            nll = per_pixel.sum() / batch.shape[0]
            if not gan:
                loss = nll + KL_WEIGHT * kl
            elif one_backward:
                g_loss = -disc(rec).float().mean()
                surrogate, _ = one_backward_gan_surrogate(nll, g_loss, rec, last, MAX_WEIGHT, DISC_WEIGHT, [])
                loss = surrogate + KL_WEIGHT * kl
            else:
                g_loss = -disc(rec).float().mean()
                weight = adaptive_gan_weight(nll, g_loss, last, MAX_WEIGHT)
                loss = nll + KL_WEIGHT * kl + weight * DISC_WEIGHT * g_loss
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if not gan:
            return
        with autocast():
            disc.requires_grad_(True)
            d_loss = hinge_d_loss(disc(batch).float(), disc(rec.detach()).float())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    return step, disc


def _without_donated_buffers(step: Callable[[], None]) -> Callable[[], None]:
    """The reference adaptive weight calls `autograd.grad(..., retain_graph=True)` through the compiled
    VAE, which inductor's donated buffers forbid; the reference compiled step needs them off."""

    def run() -> None:
        with torch._functorch.config.patch(donated_buffer=False):
            step()

    return run


def build_variants(
    preset: str,
    lpips_net: nn.Module,
    batch: torch.Tensor,
    variants: tuple[str, ...],
    gan: bool,
    autocast_dtype: torch.dtype | None,
    **overrides: object,
) -> dict[str, Callable[[], None]]:
    ours, theirs = twin_models(preset, **overrides)
    steps = {}
    for name in variants:
        is_diffusers = name.startswith("diffusers")
        ae = copy.deepcopy(theirs if is_diffusers else ours).to(batch.device).train()
        lp = copy.deepcopy(lpips_net).to(batch.device)
        step, disc = make_step(
            ae,
            is_diffusers,
            lp,
            batch,
            one_backward=name in ("ours_one_backward", "ours_compiled"),
            gan=gan,
            autocast_dtype=autocast_dtype,
        )
        if name == "ours_compiled":
            compile_for_training(ae, disc, lp, "default")
        elif name == "diffusers_compiled":
            for module in (ae, disc, lp):
                module.compile()
            step = _without_donated_buffers(step)
        steps[name] = step
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, dict]:
    """Warm each variant (compile time recorded), then median seconds per step, interleaved."""
    out: dict[str, dict] = {}
    for name, step in steps.items():
        _sync(device)
        t = time.perf_counter()
        step()
        step()
        _sync(device)
        out[name] = {"warmup_s": time.perf_counter() - t, "times": []}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            out[name]["times"].append(time.perf_counter() - t)
    for name in steps:
        out[name]["seconds_per_step"] = statistics.median(out[name].pop("times"))
    return out


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step, counted by torch's dispatcher (matmuls and convolutions), not estimated."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def bench_train_step(
    preset: str,
    lpips_net: nn.Module,
    batch_size: int,
    resolution: int,
    repeats: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    variants: tuple[str, ...] = VARIANTS,
    gan: bool = True,
    **overrides: object,
) -> dict:
    torch.manual_seed(0)
    batch = (torch.rand(batch_size, 3, resolution, resolution) * 2 - 1).to(device)
    steps = build_variants(preset, lpips_net, batch, variants, gan, autocast_dtype, **overrides)
    timings = time_variants(steps, device, repeats)
    out: dict = {
        "preset": preset,
        "batch": batch_size,
        "resolution": resolution,
        "dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "gan": gan,
        "repeats": repeats,
    }
    for name, t in timings.items():
        out[f"{name}_images_per_s"] = batch_size / t["seconds_per_step"]
        out[f"{name}_warmup_s"] = t["warmup_s"]
    ref = timings["diffusers"]["seconds_per_step"]
    for name, t in timings.items():
        if name != "diffusers":
            out[f"ratio_{name}_over_diffusers"] = ref / t["seconds_per_step"]
    ours = {k: v for k, v in timings.items() if k.startswith("ours")}
    best = min(ours, key=lambda k: ours[k]["seconds_per_step"])
    out["best_option"] = best
    out["ratio_ours_over_diffusers"] = ref / ours[best]["seconds_per_step"]
    if "diffusers_compiled" in timings:
        out["ratio_ours_over_diffusers_compiled"] = (
            timings["diffusers_compiled"]["seconds_per_step"] / ours[best]["seconds_per_step"]
        )
    return out
