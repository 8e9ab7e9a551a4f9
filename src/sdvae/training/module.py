"""LightningModule for VAE-GAN training with manual optimization.

Why manual: the generator and discriminator take turns, accumulate separately and have their
own schedules. Why our own counters: under manual optimization Lightning's `global_step`
counts every optimizer.step() of every optimizer, so `disc_start` keyed on it fires early
(Lightning #17958); `windows` counts optimisation windows and `g_steps` generator steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sdvae.config import Config
from sdvae.evaluation import ReconstructionMetrics
from sdvae.latent_transforms import LatentTransform
from sdvae.losses import GeneratorTerms, VAEGANLoss
from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.models.discriminator import NLayerDiscriminator
from sdvae.training.compiling import compile_for_training
from sdvae.training.equivariance import EquivarianceSchedule
from sdvae.training.latent_noise import perturb_latents
from sdvae.training.latent_refine import refine_latents, refine_loss
from sdvae.training.plan import TrainingPlan, initial_plan
from sdvae.training.stepping import Trained, finish_window

LECAM_WARMED_UP = 10**6  # EMA updates after which 1 - decay^n is 1 in float32 for any decay < 1 - 2e-5


def freeze_encoder(autoencoder: AutoencoderKL) -> None:
    """`train.decoder_only`: the encoder and its quant conv keep their weights."""
    for m in (autoencoder.encoder, autoencoder.quant_conv):
        if m is not None:
            m.requires_grad_(False)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


def lr_lambda(schedule: str, warmup: int | Callable[[], int], total: Callable[[], int]) -> Callable[[int], float]:
    """Multiplier on the base LR per step of its own optimizer: constant, linear warmup, or warmup +
    cosine. `total()` (and `warmup()`, when callable) are read at each step because a budgeted run
    learns its length, and scales its warm-up, after its first windows; the cosine reaches 0 at
    its last step."""

    def fn(step: int) -> float:
        warm = warmup() if callable(warmup) else warmup
        return _multiplier(schedule, warm, total(), step)

    return fn


def _multiplier(schedule: str, warmup: int, total: int, step: int) -> float:
    if schedule != "constant" and warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _is_validation_row(row: dict[str, float]) -> bool:
    return any(k.startswith("val/") for k in row)


class VAEGANModule(L.LightningModule):
    def __init__(self, cfg: Config, autoencoder: AutoencoderKL, perceptual: nn.Module | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.autoencoder = autoencoder
        d = cfg.discriminator
        self.discriminator = NLayerDiscriminator(autoencoder.config.out_channels, d.ndf, d.n_layers, d.norm)
        self.loss = VAEGANLoss(cfg.loss, perceptual)
        self.ema: AveragedModel | None = None
        if cfg.train.ema:
            self.ema = AveragedModel(
                autoencoder, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True
            )
            self.ema.requires_grad_(False)
        if cfg.train.compile:  # after the EMA copy, which stays eager
            compile_for_training(autoencoder, self.discriminator, self.loss.perceptual, cfg.train.compile_mode)
        if cfg.train.decoder_only:
            freeze_encoder(autoencoder)
        self.plan: TrainingPlan = initial_plan(cfg)  # saved in checkpoints; a budgeted run replans early
        self.equivariance = EquivarianceSchedule(cfg.loss, cfg.train.seed, autoencoder.downsample_factor)
        # counters, saved in checkpoints
        self.windows = 0  # optimisation windows completed
        self.g_steps = 0
        self.d_steps = 0
        self.micro = 0  # micro-batches into the current window
        self.bad_steps = 0  # total skipped steps (non-finite)
        self.overflow_steps = 0  # windows a GradScaler skipped while finding its scale (16-mixed)
        self.eq_steps = 0  # generator steps that carried the equivariance term
        self._eq_window = False
        self.consecutive_bad = 0
        self.window_done = False
        self.window_bad = torch.zeros(())  # non-finite losses seen in the current window
        self._fp16 = False  # set when fit starts (16-mixed)
        self._conv_out_hook: Any = None
        self._conv_out_input = torch.zeros(())
        self._t_last = time.perf_counter()
        self._images_since = 0
        self.history: list[dict[str, float]] = []  # per logged window, for metrics files

    # -- optimizers ------------------------------------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if self.cfg.loss.learn_logvar:
            params.append(self.loss.logvar)
        return params

    def generator_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: the encoder side (encoder, quant conv) at `lr x train.encoder_lr_scale`,
        the rest at `lr`; only the encoder learns what latent each image gets, so it can be
        given its own pace. Frozen parameters (decoder-only runs) are left out. At scale 1 it is one
        group in `generator_parameters()` order: the layout of checkpoints written before the
        option, so they resume."""
        t = self.cfg.train
        if t.encoder_lr_scale == 1.0:
            return [{"params": self.generator_parameters(), "lr": t.lr}]
        ae = self.autoencoder
        encoder_side = [*ae.encoder.parameters(), *(ae.quant_conv.parameters() if ae.quant_conv is not None else [])]
        ids = {id(p) for p in encoder_side}
        params = self.generator_parameters()
        encoder = [p for p in params if id(p) in ids]
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest, "lr": t.lr}, {"params": encoder, "lr": t.lr * t.encoder_lr_scale}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        t = self.cfg.train
        fused = {"fused": True} if torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda") else {}
        opt_g = torch.optim.AdamW(self.generator_groups(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, **fused)
        opt_d = torch.optim.AdamW(
            self.discriminator.parameters(), lr=t.disc_lr or t.lr, betas=t.betas, weight_decay=t.weight_decay, **fused
        )
        gan_on = self.cfg.loss.disc_factor > 0
        sched = [
            torch.optim.lr_scheduler.LambdaLR(
                o,
                lr_lambda(
                    t.lr_schedule,
                    self.planned_warmup,
                    lambda i=i: self.plan.optimizer_steps(t.gan_schedule, gan_on)[i],
                ),
            )
            for i, o in enumerate((opt_g, opt_d))
        ]
        return [opt_g, opt_d], sched

    # -- schedule --------------------------------------------------------------------------------------
    def planned_warmup(self) -> int:
        """The plan's LR warm-up (a checkpoint from before warm-up was planned: as written)."""
        return self.plan.warmup if self.plan.warmup is not None else self.cfg.train.warmup_steps

    @property
    def gan_active(self) -> bool:
        return self.g_steps >= self.plan.disc_start and self.cfg.loss.disc_factor > 0

    @property
    def perceptual_active(self) -> bool:
        return self.g_steps >= self.plan.perceptual_start

    @property
    def phase(self) -> str:
        """The schedule phase of the next window, as `step_timing` names them."""
        if self.gan_active:
            return "gan"
        return "perceptual" if self.perceptual_active and self.loss.perceptual is not None else "pixel"

    def window_roles(self) -> tuple[bool, bool]:
        """(train generator, train discriminator) for the current window."""
        if not self.gan_active:
            return True, False
        if self.cfg.train.gan_schedule == "both":
            return True, True
        return self.windows % 2 == 0, self.windows % 2 == 1

    # -- 16-mixed ---------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fp16 = self.trainer.precision == "16-mixed"
        if self._fp16 and self._conv_out_hook is None:  # registered after the EMA copy: never copied into it
            self._conv_out_hook = self.autoencoder.decoder.conv_out.register_forward_pre_hook(self._keep_conv_out_input)

    def _keep_conv_out_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._conv_out_input = args[0]

    def generator_terms(self, batch: torch.Tensor, xrec: torch.Tensor, posterior: Any, use_gan: bool) -> GeneratorTerms:
        """The generator's loss terms. Under 16-mixed, LPIPS, the discriminator and the last layer's
        weight gradients run in fp32 on an fp32 copy of the reconstruction: the one-backward surrogate
        takes their gradients outside the scaled backward, where fp16 would flush them to zero."""
        conv_out = self.autoencoder.decoder.conv_out
        last = conv_out.weight if use_gan else None
        if not self._fp16:
            logits = self.discriminator(xrec) if use_gan else None
            return self.loss.generator(batch, xrec, posterior, logits, last, self.perceptual_active)
        with torch.autocast(batch.device.type, enabled=False):
            xrec32 = xrec.float()
            logits = self.discriminator(xrec32) if use_gan else None
            last_out = None
            if use_gan:
                last_out = F.conv2d(
                    self._conv_out_input.detach().float(), conv_out.weight, conv_out.bias, padding=conv_out.padding
                )
            return self.loss.generator(batch, xrec32, posterior, logits, last, self.perceptual_active, last_out)

    def equivariance_term(self, batch: torch.Tensor, posterior: Any, transform: LatentTransform) -> torch.Tensor:
        """EQ-VAE's pair: a fresh posterior sample, transformed and decoded, against the same
        transform of the image. Only reconstruction and LPIPS see it: the GAN and its adaptive
        weight stay on the plain reconstruction (docs/training.md, "Equivariance regulariser")."""
        decoded = self.autoencoder.decode(transform.latent(posterior.sample()))
        f = self.autoencoder.downsample_factor
        target = transform.image(batch, (transform.latent_size[0] * f, transform.latent_size[1] * f))
        with torch.autocast(batch.device.type, enabled=False):
            return self.loss.equivariance(target, decoded.float(), batch[0].numel(), self.perceptual_active)

    def refine_term(self, batch: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Semi-amortised encoding: the encoder's mean pulled towards latents a few Adam steps
        through the decoder moved closer to this batch (training/latent_refine.py)."""
        c = self.cfg.loss
        refined = refine_latents(self.autoencoder.decode, mean, batch, c.refine_steps, c.refine_lr)
        with torch.autocast(batch.device.type, enabled=False):
            return c.refine_weight * refine_loss(mean, refined, batch[0].numel())

    # -- training --------------------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        t = self.cfg.train
        if self.windows >= self.plan.windows:  # resumed from a checkpoint written at the last window
            self.trainer.should_stop = True
            return
        k = t.accumulate_grad_batches
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        train_g, train_d = self.window_roles()
        use_gan = self.gan_active
        logs: dict[str, torch.Tensor] = {}
        if self.micro == 0:
            self.window_bad = torch.zeros((), device=batch.device)  # kept across the window's micro-batches

        # Backwards always run, finite or not: under DDP each backward is a collective (gradient
        # all-reduce), so a rank that skipped one would pair its next collective with another
        # rank's. A non-finite loss is counted here and its window skipped on every rank at its end.
        self.discriminator.requires_grad_(False)
        if train_g:
            posterior = self.autoencoder.encode(batch)
            xrec = self.autoencoder.decode(perturb_latents(posterior.sample(), self.cfg.loss.latent_noise))
            terms = self.generator_terms(batch, xrec, posterior, use_gan)
            # after generator_terms: under 16-mixed it recomputes the last layer from the input the
            # main decode left at conv_out, which the second decode below overwrites
            transform = self.equivariance.draw(self.g_steps, tuple(posterior.mean.shape[-2:]))
            self._eq_window = transform is not None
            if transform is not None:
                terms = terms.plus(self.equivariance_term(batch, posterior, transform), "eq_loss")
            if self.cfg.loss.refine_steps > 0:
                terms = terms.plus(self.refine_term(batch, posterior.mean), "refine_loss")
            logs.update(terms.logs)
            self.window_bad = self.window_bad + (~(torch.isfinite(terms.loss) & torch.isfinite(terms.backward))).float()
            self.manual_backward(terms.backward / k)
        else:
            with torch.no_grad():
                xrec = self.autoencoder(batch, sample_posterior=True)[0]
        self.discriminator.requires_grad_(True)
        if train_d:
            logits_real = self.discriminator(batch.detach())
            logits_fake_d = self.discriminator(xrec.detach())
            d_loss, d_logs = self.loss.discriminator(logits_real, logits_fake_d)
            logs.update(d_logs)
            self.window_bad = self.window_bad + (~torch.isfinite(d_loss)).float()
            self.manual_backward(d_loss / k)

        self.micro += 1
        self._images_since += batch.shape[0]
        self.window_done = self.micro >= k
        if not self.window_done:
            return
        self.micro = 0
        trained = [
            Trained(name, opt.optimizer, params, opt.step)
            for train, opt, params, name in (
                (train_g, opt_g, self.generator_parameters(), "g"),
                (train_d, opt_d, list(self.discriminator.parameters()), "d"),
            )
            if train
        ]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        outcome = finish_window(
            trained,
            scaler,
            t.grad_clip,
            self.window_bad,
            lambda bad: self.trainer.strategy.reduce(bad, reduce_op="max"),
        )
        logs.update(outcome.logs)
        # an fp16 overflow while the scaler still has room (scale >= 1) is how it finds its scale:
        # skipped like any bad window, but not counted towards max_bad_steps
        calibrating = outcome.overflow and scaler is not None and scaler.get_scale() >= 1.0
        if outcome.stepped:
            self.consecutive_bad = 0
            if train_g:
                sch_g.step()
                self.g_steps += 1
                self.eq_steps += int(self._eq_window)
                if self.ema is not None:
                    self.ema.update_parameters(self.autoencoder)
            if train_d:
                sch_d.step()
                self.d_steps += 1
        elif calibrating:
            self.overflow_steps += 1
        else:  # agreed across ranks: every rank skips this window and counts it once
            self.bad_steps += 1
            self.consecutive_bad += 1
            if self.consecutive_bad >= t.max_bad_steps:
                raise NonFiniteTrainingError(
                    f"{self.consecutive_bad} consecutive steps had non-finite loss or gradients (window "
                    f"{self.windows}); stopping. Lower train.lr, enable train.grad_clip, or use precision "
                    f"bf16-mixed instead of 16-mixed. Last checkpoint holds the last finite weights."
                )
        self.windows += 1
        self._log_window(logs, opt_g)
        if self.windows >= self.plan.windows:
            self.trainer.should_stop = True

    def _log_window(self, logs: dict[str, torch.Tensor], opt_g: Any) -> None:
        self.log("step", float(self.windows), prog_bar=True, logger=False)
        if "total_loss" in logs:
            self.log("loss", logs["total_loss"], prog_bar=True, logger=False)
        if self.windows % self.cfg.train.log_every and self.windows != self.plan.windows:
            return
        now = time.perf_counter()
        row = {f"train/{k}": float(v) for k, v in logs.items()}
        row["train/images_per_s"] = self._images_since * self.trainer.world_size / max(now - self._t_last, 1e-9)
        row["train/lr"] = float(opt_g.param_groups[0]["lr"])
        row["train/g_steps"], row["train/d_steps"] = float(self.g_steps), float(self.d_steps)
        row["train/skipped_steps"] = float(self.bad_steps)
        if self.overflow_steps:
            row["train/overflow_steps"] = float(self.overflow_steps)
        if self.equivariance.enabled:
            row["train/eq_steps"] = float(self.eq_steps)
        self._t_last, self._images_since = now, 0
        if self.logger is not None:
            self.logger.log_metrics(row, step=self.windows)
        self.history.append({"step": self.windows, **row})

    # -- validation ------------------------------------------------------------------------------------
    def eval_autoencoder(self) -> AutoencoderKL:
        """The weights validation scores: those export and evaluate ship (the EMA when `train.ema`
        and `eval.use_ema` are both on), so a validation curve describes the model shipped."""
        return self.ema.module if self.ema is not None and self.cfg.eval.use_ema else self.autoencoder

    def on_validation_epoch_start(self) -> None:
        self.val_metrics = ReconstructionMetrics(self.loss.perceptual).to(self.device)
        self.val_grid: tuple[torch.Tensor, torch.Tensor] | None = None

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        model = self.eval_autoencoder()
        xrec = model.reconstruct(batch).clamp(-1, 1)
        self.val_metrics.update(batch, xrec)
        if batch_idx == 0:
            self.val_grid = (batch.detach().cpu(), xrec.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": float(v) for k, v in self.val_metrics.compute().items() if v is not None}
        # The metric is a submodule only while validation runs: left attached, its keys (a second
        # copy of LPIPS) would enter every later checkpoint, which a fresh module cannot load.
        del self.val_metrics
        self.val_scores = values
        if self.logger is not None:
            self.logger.log_metrics(values, step=self.windows)
        # A re-run of a finished run validates its last window again: replace that row, do not repeat it.
        self.history = [r for r in self.history if r["step"] != self.windows or not _is_validation_row(r)]
        self.history.append({"step": self.windows, **values})
        self.log("val_lpips", values.get("val/lpips", float("nan")), prog_bar=True, logger=False, sync_dist=False)

    # -- checkpoint state --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, tensor in checkpoint["state_dict"].items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteTrainingError(f"refusing to write a checkpoint: {name} holds non-finite values")
        checkpoint["sdvae_counters"] = {
            "windows": self.windows,
            "g_steps": self.g_steps,
            "d_steps": self.d_steps,
            "bad_steps": self.bad_steps,
            "overflow_steps": self.overflow_steps,
            "eq_steps": self.eq_steps,
            "micro": self.micro,
        }
        checkpoint["sdvae_history"] = self.history
        checkpoint["sdvae_plan"] = self.plan.as_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("val_metrics.")]:  # written by earlier versions
            del state[key]
        # written before LeCam's anchors were debiased: they are plain EMAs already, so they count as
        # warmed up (debias factor 1); a count of 0 would divide them by 1 - decay, 100x at 0.99
        state.setdefault("loss.ema_updates", torch.tensor(float(LECAM_WARMED_UP)))
        c = checkpoint["sdvae_counters"]
        self.windows, self.g_steps, self.d_steps = c["windows"], c["g_steps"], c["d_steps"]
        self.bad_steps, self.micro = c["bad_steps"], c["micro"]
        self.overflow_steps = c.get("overflow_steps", 0)
        self.eq_steps = c.get("eq_steps", 0)
        self.history = list(checkpoint.get("sdvae_history", []))
        if "sdvae_plan" in checkpoint:
            self.plan = TrainingPlan(**checkpoint["sdvae_plan"])
