"""Gradient checks a speed option must pass on the machine it runs on before it may be a default.

Every gradient of the autoencoder and discriminator (generator step, then discriminator step)
is compared with fp32 eager, the reference; fp32 means true fp32 here (TF32 off for the run).
- one backward vs the two-pass adaptive weight (LDM's `autograd.grad` formulation), both in the
  same precision: they compute the same function, so they must agree to round-off;
- `train.compile` against eager: compiled kernels may not add error beyond what the precision
  itself costs. Per tensor, compiled-vs-fp32 error <= 2 x eager-vs-fp32 error + 0.01 (bf16), or
  <= 1e-3 relative (fp32). PyTorch #140913 (NHWC GroupNorm gradients wrong under compile in bf16)
  shows as a few GroupNorm tensors far outside that bound while the global error stays small,
  hence per tensor. Tensors below 1e-3 of the largest gradient norm are left out (round-off only).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdvae.config import LossConfig
from sdvae.losses import VAEGANLoss, adaptive_gan_weight
from sdvae.models import AutoencoderKL, NLayerDiscriminator
from sdvae.training.compiling import compile_for_training

FP32_TOLERANCE = 1e-3
FP16_LOSS_SCALE = 2.0**16  # GradScaler's initial scale
BF16_SLACK = 0.01


def _gradients(
    ae: nn.Module,
    disc: nn.Module,
    lpips_net: nn.Module,
    x: torch.Tensor,
    *,
    dtype: torch.dtype | None,
    two_pass: bool,
    loss_scale: float = 1.0,
    fp32_gan_terms: bool = False,
) -> list[torch.Tensor]:
    """Gradients of one generator step and one discriminator step, posterior noise fixed.
    16-mixed as the trainer runs it: `loss_scale` stands in for the GradScaler (backwards scaled,
    gradients divided after); `fp32_gan_terms` is the trainer's fp16 path (LPIPS, discriminator and
    the last layer's weight gradient in fp32 on an fp32 copy of the reconstruction)."""
    loss_fn = VAEGANLoss(LossConfig(), lpips_net)
    autocast = torch.autocast(x.device.type, dtype) if dtype is not None else nullcontext()
    conv_out = ae.decoder.conv_out
    seen: dict[str, torch.Tensor] = {}
    hook = conv_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    with autocast:
        disc.requires_grad_(False)
        xrec, post = ae(x, generator=torch.Generator(x.device).manual_seed(1))
        last = conv_out.weight
        if two_pass:
            rec, _, _ = loss_fn.reconstruction(x, xrec)
            nll = rec.sum() / x.shape[0]
            g_loss = -disc(xrec).float().mean()
            weight = adaptive_gan_weight(nll, g_loss, last, loss_fn.cfg.adaptive_weight_max)
            total = (
                nll + loss_fn.cfg.kl_weight * post.kl().sum() / x.shape[0] + weight * loss_fn.cfg.disc_weight * g_loss
            )
        elif not fp32_gan_terms:
            total = loss_fn.generator(x, xrec, post, disc(xrec), last).backward
    hook.remove()
    if fp32_gan_terms:
        with torch.autocast(x.device.type, enabled=False):
            xrec32 = xrec.float()
            last_out = F.conv2d(seen["input"].detach().float(), last, conv_out.bias, padding=conv_out.padding)
            total = loss_fn.generator(x, xrec32, post, disc(xrec32), last, last_out=last_out).backward
    (total * loss_scale).backward()
    with autocast:
        disc.requires_grad_(True)
        d_loss, _ = loss_fn.discriminator(disc(x), disc(xrec.detach()))
    (d_loss * loss_scale).backward()
    return [p.grad.float().clone() / loss_scale for p in (*ae.parameters(), *disc.parameters())]


def _relative_errors(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float | None]:
    """Per tensor ||a - b|| / ||b||; None where the reference norm is below 1e-3 of the largest."""
    norms = [float(r.norm()) for r in ref]
    floor = 1e-3 * max(norms)
    return [float((g - r).norm()) / n if n >= floor else None for g, r, n in zip(grads, ref, norms, strict=True)]


def _summary(errors: list[float | None], names: list[str]) -> dict[str, Any]:
    kept = [(e, n) for e, n in zip(errors, names, strict=True) if e is not None]
    worst = max(kept)
    return {"max_relative_error": worst[0], "worst_tensor": worst[1], "tensors_compared": len(kept)}


def check_gradients(
    preset: str,
    resolution: int,
    batch: int,
    device: torch.device,
    lpips_net: nn.Module,
    compiled: tuple[str, ...] = ("fp32", "bf16"),
    **overrides: Any,
) -> dict[str, Any]:
    """fp32 eager reference, eager bf16, one-backward vs two-pass, then `compiled` precisions."""
    torch.manual_seed(0)
    ae = AutoencoderKL.from_preset(preset, **overrides).train().to(device)
    disc = NLayerDiscriminator(3, 64 if resolution >= 128 else 8, 3 if resolution >= 128 else 2, "group").to(device)
    lpips_net = lpips_net.to(device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    names = [f"autoencoder.{n}" for n, _ in ae.named_parameters()] + [f"disc.{n}" for n, _ in disc.named_parameters()]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:

        def run(dtype: torch.dtype | None, *, two_pass: bool = False, compiled: bool = False, **fp16: Any) -> list:
            a, d, lp = copy.deepcopy(ae), copy.deepcopy(disc), copy.deepcopy(lpips_net)
            if compiled:
                compile_for_training(a, d, lp, "default")
            return _gradients(a, d, lp, x, dtype=dtype, two_pass=two_pass, **fp16)

        ref = run(None, two_pass=True)
        bf16 = torch.bfloat16
        grads = {
            "fp32_one_backward": run(None),
            "bf16_two_pass": run(bf16, two_pass=True),
            "bf16_one_backward": run(bf16),
        }
        out: dict[str, Any] = {"preset": preset, "resolution": resolution, "batch": batch, "overrides": overrides}
        bf16_eager = _relative_errors(grads["bf16_one_backward"], ref)
        ob_same_precision = _relative_errors(grads["bf16_one_backward"], grads["bf16_two_pass"])
        fp32_ob = _relative_errors(grads["fp32_one_backward"], ref)
        out["bf16_eager_vs_fp32"] = _summary(bf16_eager, names)
        out["one_backward_vs_two_pass_fp32"] = _within_fp32(fp32_ob, names)
        bf16_two_pass_err = _relative_errors(grads["bf16_two_pass"], ref)
        out["one_backward_vs_two_pass_bf16"] = _within_precision(ob_same_precision, bf16_two_pass_err, names)
        if "bf16" in compiled:  # first: the one a GPU run uses
            compiled_bf16 = _relative_errors(run(bf16, compiled=True), ref)
            out["compile_bf16_vs_eager_fp32"] = _within_precision(compiled_bf16, bf16_eager, names)
        if "fp32" in compiled:
            compiled_fp32 = _relative_errors(run(None, compiled=True), ref)
            out["compile_fp32_vs_eager_fp32"] = _within_fp32(compiled_fp32, names)
        if device.type == "cuda":  # 16-mixed: pre-Ampere GPUs' precision; fp16 autocast is a CUDA path

            def scaled(**how: Any) -> tuple[list[torch.Tensor], float]:
                """As GradScaler settles: the largest power-of-two scale whose gradients are finite."""
                scale = FP16_LOSS_SCALE
                while True:
                    grads = run(torch.float16, loss_scale=scale, **how)
                    if all(torch.isfinite(g).all() for g in grads) or scale <= 1.0:
                        return grads, scale
                    scale /= 2

            fp16, scale = scaled(fp32_gan_terms=True)  # the trainer's 16-mixed
            errors = _relative_errors(fp16, ref)
            out["fp16_mixed_one_backward_vs_fp32"] = {
                **_within_precision(errors, bf16_eager, names),
                "loss_scale": scale,
            }
            # the GAN terms in fp16 (the trainer before the fix): recorded, not judged
            before, scale = scaled()
            out["fp16_gan_terms_in_fp16_vs_fp32"] = {
                **_summary(_relative_errors(before, ref), names),
                "loss_scale": scale,
            }
        else:
            out["fp16"] = "16-mixed is checked on CUDA only (Lightning runs 16-mixed as bf16 on a CPU)"
        out["channels_last"] = "not an option of sdvae (eager NHWC was 0.85x on an H100), so not checked"
        out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict) and "passed" in v)
        return out
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _within_fp32(errors: list[float | None], names: list[str]) -> dict:
    """Each tensor within the fp32 tolerance of the fp32 eager reference."""
    passed = all(e is None or e <= FP32_TOLERANCE for e in errors)
    return {**_summary(errors, names), "tolerance": FP32_TOLERANCE, "passed": passed}


def _within_precision(errors: list[float | None], precision_errors: list[float | None], names: list[str]) -> dict:
    """Each tensor's error within twice what eager bf16 itself costs that tensor, plus slack."""
    bounds = [None if p is None else 2 * p + BF16_SLACK for p in precision_errors]
    over = [
        {"tensor": n, "error": e, "bound": b}
        for e, b, n in zip(errors, bounds, names, strict=True)
        if e is not None and b is not None and e > b
    ]
    return {
        **_summary(errors, names),
        "tolerance": f"per tensor <= 2 x (eager bf16 vs fp32) + {BF16_SLACK}",
        "over_bound": over[:10],
        "passed": not over,
    }
