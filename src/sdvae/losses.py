"""VAE-GAN objective in the LDM `LPIPSWithDiscriminator` tradition, with its known bugs fixed.

Reduction convention (the one LDM uses, stated because `kl_weight` only means something with it):
the reconstruction NLL is summed over pixels and channels of each image, the KL is summed over
latent elements of each image, and both are averaged over the batch. So `kl_weight = 1e-6`
weighs one image's total KL against its total per-pixel error.

Fixes over the references: LPIPS is computed with gradients (it is a loss, not a metric), and
the learnable log-variance is a real parameter handed to the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdvae.config import LossConfig
from sdvae.models.autoencoder_kl import DiagonalGaussianDistribution


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def adaptive_gan_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """||grad nll|| / (||grad gan|| + 1e-4) at the decoder's last layer: balances the two terms.

    The reference formulation (LDM, diffusers' example trainer): each `autograd.grad` back-propagates
    through LPIPS or the discriminator, and the full backward afterwards does both again.
    `one_backward_gan_surrogate` gives the same gradients with each network back-propagated once.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return _ratio(nll_grad, g_grad, max_weight)


def _ratio(nll_grad: torch.Tensor, g_grad: torch.Tensor, max_weight: float) -> torch.Tensor:
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def one_backward_gan_surrogate(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    xrec: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float,
    gan_scale: float,
    nll_params: list[torch.Tensor],
    last_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate, adaptive weight): `surrogate.backward()` fills every gradient that
    `(nll + w * gan_scale * g_loss).backward()` would, w being the reference adaptive weight.

    How: the gradients of the NLL and of the GAN loss are taken once, with respect to the
    reconstruction (one pass through LPIPS, one through the discriminator). `xrec` is the output
    of the decoder's last conv, so each last-layer weight gradient follows from that conv's
    input and the output gradient alone (`autograd.grad` of `xrec` runs only that conv's weight
    backward). Then a single backward through decoder and encoder with the combined gradient.
    `nll_params` are leaves the NLL reaches other than through `xrec` (the learnable logvar).

    Under fp16 (16-mixed) these gradients are taken here, outside the GradScaler's scaled
    backward, and per-pixel GAN gradients of a mean over N x 900 patch logits are 1e-4 to 1e-6:
    subnormal or zero in fp16. So the trainer passes `xrec` as an fp32 tensor with LPIPS and the
    discriminator run on it in fp32, and `last_out`, the decoder's last layer recomputed in fp32
    from its input, whose weight gradients are then fp32 too. The main backward stays scaled.
    """
    g_nll, *g_params = torch.autograd.grad(nll, [xrec, *nll_params])
    (g_gan,) = torch.autograd.grad(g_loss, [xrec])
    out = xrec if last_out is None else last_out
    (w_nll,) = torch.autograd.grad(out, [last_layer], grad_outputs=g_nll.to(out.dtype), retain_graph=True)
    (w_gan,) = torch.autograd.grad(out, [last_layer], grad_outputs=g_gan.to(out.dtype), retain_graph=True)
    weight = _ratio(w_nll, w_gan, max_weight)
    grad_xrec = (g_nll.float() + (weight * gan_scale) * g_gan.float()).to(xrec.dtype)
    surrogate = (xrec * grad_xrec).sum()
    for param, grad in zip(nll_params, g_params, strict=True):
        surrogate = surrogate + (param * grad).sum()
    return surrogate, weight


@dataclass
class GeneratorTerms:
    loss: torch.Tensor  # the objective's value (for logging and the finite check)
    logs: dict[str, torch.Tensor]
    backward: torch.Tensor  # what to differentiate: the loss itself, or a surrogate with its gradients

    def plus(self, term: torch.Tensor, name: str) -> GeneratorTerms:
        """These terms and one more, differentiated as itself (outside the GAN's adaptive weight)."""
        logs = {**self.logs, name: term.detach()}
        logs["total_loss"] = (self.loss + term).detach()
        return GeneratorTerms(self.loss + term, logs, self.backward + term)


class VAEGANLoss(nn.Module):
    """Generator and discriminator losses; `perceptual` is a frozen LPIPS network (or None)."""

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.perceptual = perceptual if cfg.perceptual_weight > 0 else None
        # A parameter either way (checkpoint layout stays the same); optimized only when learn_logvar.
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self.d_loss_fn = hinge_d_loss if cfg.gan == "hinge" else vanilla_d_loss
        self.register_buffer("ema_real", torch.zeros(()))  # LeCam anchors (biased towards 0 ...
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("ema_updates", torch.zeros(()))  # ... until divided by 1 - decay^updates)

    def reconstruction(
        self, x: torch.Tensor, xrec: torch.Tensor, perceptual: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pixel reconstruction error (+ weighted LPIPS broadcast over pixels, when `perceptual`)."""
        diff = x.float() - xrec.float()
        rec = diff.abs() if self.cfg.reconstruction == "l1" else diff.pow(2)
        pixel = rec.mean()
        if self.cfg.lowpass_weight > 0:
            rec = rec + self.cfg.lowpass_weight * self._lowpass(diff)
        if self.perceptual is not None and perceptual:
            p = self.perceptual(x.float(), xrec.float())  # (N, 1, 1, 1), differentiable w.r.t. xrec
            rec = rec + self.cfg.perceptual_weight * p
            return rec, pixel, p.mean()
        return rec, pixel, torch.zeros((), device=x.device)

    def _lowpass(self, diff: torch.Tensor) -> torch.Tensor:
        """The error of block means (`lowpass_factor` pixels, partial blocks at the far edges),
        per pixel: the shifts of colour and level that per-pixel L1 on texture barely sees."""
        f = self.cfg.lowpass_factor
        means = F.avg_pool2d(diff, f, stride=f, ceil_mode=True)
        err = means.abs() if self.cfg.reconstruction == "l1" else means.pow(2)
        return F.interpolate(err, scale_factor=f, mode="nearest")[..., : diff.shape[-2], : diff.shape[-1]]

    def equivariance(
        self, target: torch.Tensor, decoded: torch.Tensor, plain_values: int, perceptual: bool = True
    ) -> torch.Tensor:
        """`loss.equivariance_weight` x the reconstruction NLL of a transformed pair (EQ-VAE), per
        value as heavy as the plain one: its mean times `plain_values`, the values of one plain
        image (the plain NLL sums over them), so a 4x smaller pair does not weigh 16x less."""
        rec, _, _ = self.reconstruction(target, decoded, perceptual)
        nll = (rec / torch.exp(self.logvar) + self.logvar).mean() * plain_values
        return self.cfg.equivariance_weight * nll

    def generator(
        self,
        x: torch.Tensor,
        xrec: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        logits_fake: torch.Tensor | None,
        last_layer: torch.Tensor | None,
        perceptual: bool = True,
        last_out: torch.Tensor | None = None,
    ) -> GeneratorTerms:
        """`perceptual=False` leaves LPIPS out of this step (the pixel-only phase before `perceptual_start`);
        `last_out`: see `one_backward_gan_surrogate` (16-mixed)."""
        n = x.shape[0]
        rec, pixel, p_loss = self.reconstruction(x, xrec, perceptual)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / n
        kl = posterior.kl().sum() / n
        loss = nll + self.cfg.kl_weight * kl
        logs = {
            "rec_loss": pixel.detach(),
            "p_loss": p_loss.detach(),
            "nll_loss": nll.detach(),
            "kl_loss": kl.detach(),
            "logvar": self.logvar.detach(),
        }
        backward = loss
        if logits_fake is not None:
            g_loss = -logits_fake.float().mean()
            gan_scale = self.cfg.disc_weight * self.cfg.disc_factor
            if last_layer is not None and self.training:
                nll_params = [self.logvar] if self.logvar.requires_grad else []
                surrogate, d_weight = one_backward_gan_surrogate(
                    nll, g_loss, xrec, last_layer, self.cfg.adaptive_weight_max, gan_scale, nll_params, last_out
                )
                backward = surrogate + self.cfg.kl_weight * kl
                loss = loss.detach() + d_weight * gan_scale * g_loss.detach()
            else:
                d_weight = torch.ones((), device=x.device)
                loss = loss + d_weight * gan_scale * g_loss
                backward = loss
            d_weight = d_weight * self.cfg.disc_weight
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["total_loss"] = loss.detach()
        return GeneratorTerms(loss, logs, backward)

    def discriminator(
        self, logits_real: torch.Tensor, logits_fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real, fake = logits_real.float(), logits_fake.float()
        d_loss = self.cfg.disc_factor * self.d_loss_fn(real, fake)
        logs = {"disc_loss": d_loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
        if self.cfg.lecam_weight > 0:
            decay = self.cfg.lecam_decay
            with torch.no_grad():
                self.ema_real.mul_(decay).add_((1 - decay) * real.mean())
                self.ema_fake.mul_(decay).add_((1 - decay) * fake.mean())
                self.ema_updates.add_(1)
                debias = 1 - decay ** float(self.ema_updates)  # zero-debiased, as the reference (Adam's bias fix)
                anchor_real, anchor_fake = self.ema_real / debias, self.ema_fake / debias
            reg = F.relu(real - anchor_fake).pow(2).mean() + F.relu(anchor_real - fake).pow(2).mean()
            d_loss = d_loss + self.cfg.lecam_weight * reg
            logs["lecam_reg"] = reg.detach()
        return d_loss, logs
