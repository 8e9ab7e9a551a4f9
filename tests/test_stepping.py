"""What the GPU presets need and the CPU default never shows: loss-scaled GAN gradients under
16-mixed, one loss-scale update per window with two optimizers, debiased LeCam anchors, the
weights validation scores, and DDP settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdvae.config import LossConfig, config_from_dict
from sdvae.losses import VAEGANLoss, one_backward_gan_surrogate
from sdvae.training.stepping import Trained, finish_window


def _surrogate_case(mode: str) -> tuple[float, torch.Tensor]:
    """(adaptive weight, last-layer gradient) for a decoder whose last layer (an fp32 master weight)
    runs in fp32 or, as autocast runs it under 16-mixed, in fp16; its GAN term's per-pixel
    gradients are ~1e-8, as those of a mean over many patch logits can be."""
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(4, 64, 64, 8, generator=gen)
    target = torch.randn(4, 64, 64, 3, generator=gen)
    last = nn.Parameter(torch.randn(3, 8, generator=gen))
    last_out = None
    if mode == "fp32":
        xrec = h @ last.t()
    else:
        xrec = h.half() @ last.half().t()  # what the decoder's last conv gives under fp16 autocast
        if mode == "fp16_fixed":  # the trainer's 16-mixed path: losses on an fp32 copy, last layer redone in fp32
            xrec = xrec.float()
            last_out = h.detach() @ last.t()
    nll = (target - xrec.float()).abs().mean()
    g_loss = -(xrec.float() * 1e-3).mean()  # 2e-8 per pixel: zero in fp16
    surrogate, weight = one_backward_gan_surrogate(nll, g_loss, xrec, last, 1e4, 0.5, [], last_out)
    surrogate.backward()
    return float(weight), last.grad.float()


def test_fp16_gan_gradients_are_taken_in_fp32():
    """Per-pixel GAN gradients here are 2e-8: zero in fp16 (its smallest subnormal is 6e-8). Taken
    in fp16, the adaptive weight's denominator loses the GAN term (the weight came out 9x too
    large, the last layer's gradient 44% off); the 16-mixed path (an fp32 copy of the
    reconstruction, the last layer's weight gradient in fp32) matches fp32 within 0.3%."""
    ref_weight, ref_grad = _surrogate_case("fp32")
    weight, grad = _surrogate_case("fp16_fixed")
    assert weight == pytest.approx(ref_weight, rel=1e-2)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-2
    old_weight, old_grad = _surrogate_case("fp16_old")  # how it went before
    assert old_weight > 3 * ref_weight and float((old_grad - ref_grad).norm() / ref_grad.norm()) > 0.1


def _optimizers() -> tuple[nn.Parameter, nn.Parameter, torch.optim.Optimizer, torch.optim.Optimizer]:
    pg, pd = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    return pg, pd, torch.optim.AdamW([pg], lr=0.1), torch.optim.AdamW([pd], lr=0.1)


def _never(_: object) -> object:
    raise AssertionError("with a scaler, the scaler steps")


def test_two_optimizers_share_one_scale_update_per_window():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scaler.scale(torch.ones(()))  # its first use sets the scale up (the trainer's scaled backward)
    pg, pd, opt_g, opt_d = _optimizers()
    ref_d = nn.Parameter(torch.ones(4))
    ref_opt = torch.optim.AdamW([ref_d], lr=0.1)
    true_grad = torch.tensor([0.1, -0.2, 0.3, -0.4])
    # a finite window: both step, D with its true (unscaled) gradient
    pg.grad, pd.grad = true_grad * 2.0**10, true_grad * 2.0**10
    ref_d.grad = true_grad.clone()
    ref_opt.step()
    trained = [Trained("g", opt_g, [pg], _never), Trained("d", opt_d, [pd], _never)]
    done = finish_window(trained, scaler, 0.0, torch.zeros(()), lambda b: b)
    assert done.stepped and torch.equal(pd.detach(), ref_d.detach()) and pg.grad is None
    # G overflows: the window is skipped for both, and the scale halves once (not once per optimizer)
    before_g, before_d = pg.detach().clone(), pd.detach().clone()
    pg.grad, pd.grad = torch.full((4,), float("inf")), true_grad * 2.0**10
    done = finish_window(trained, scaler, 0.0, torch.zeros(()), lambda b: b)
    assert not done.stepped and done.overflow and scaler.get_scale() == 2.0**9  # an overflow, not divergence
    assert torch.equal(pg.detach(), before_g) and torch.equal(pd.detach(), before_d)
    # a non-finite loss is no overflow, even under a scaler: it counts towards max_bad_steps
    pg.grad, pd.grad = true_grad * 2.0**9, true_grad * 2.0**9
    done = finish_window(trained, scaler, 0.0, torch.ones(()), lambda b: b)
    assert not done.stepped and not done.overflow


def test_a_non_finite_loss_on_any_rank_skips_the_window_everywhere():
    pg, pd, opt_g, opt_d = _optimizers()
    pg.grad, pd.grad = torch.ones(4), torch.ones(4)
    steps: list[str] = []
    trained = [
        Trained("g", opt_g, [pg], lambda: steps.append("g")),
        Trained("d", opt_d, [pd], lambda: steps.append("d")),
    ]
    other_rank_saw_nan = lambda bad: torch.maximum(bad, torch.ones(()))  # noqa: E731
    done = finish_window(trained, None, 1.0, torch.zeros(()), other_rank_saw_nan)
    assert not done.stepped and not done.overflow and steps == [] and pg.grad is None and pd.grad is None
    pg.grad, pd.grad = torch.ones(4), torch.ones(4)
    done = finish_window(trained, None, 1.0, torch.zeros(()), lambda b: b)
    assert done.stepped and steps == ["g", "d"] and set(done.logs) == {"grad_norm_g", "grad_norm_d"}


def test_lecam_anchors_are_debiased_from_the_first_update():
    loss = VAEGANLoss(LossConfig(lecam_weight=1.0, lecam_decay=0.99), None)
    _, logs = loss.discriminator(torch.tensor([2.0]), torch.tensor([-1.0]))
    # anchors equal the first means (2 and -1), not 1% of them: relu(2 + 1)^2 twice
    assert float(logs["lecam_reg"]) == pytest.approx(18.0)


def test_validation_scores_the_weights_export_ships():
    from sdvae.models.factory import build_autoencoder
    from sdvae.training.module import VAEGANModule

    params = {
        "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
        "loss": {"perceptual_weight": 0.0},
        "train": {"resolution": 32, "ema": True},
    }
    for use_ema in (True, False):
        cfg = config_from_dict({**params, "eval": {"use_ema": use_ema, "resolution": 32}})
        module = VAEGANModule(cfg, build_autoencoder(cfg.model, 32), None)
        assert (module.eval_autoencoder() is module.ema.module) == use_ema
        assert (module.eval_autoencoder() is module.autoencoder) == (not use_ema)


def test_ddp_allows_the_idle_network_no_gradient():
    from sdvae.training.trainer import build_trainer

    cfg = config_from_dict({"train": {"strategy": "ddp", "accelerator": "cpu", "devices": 2, "max_steps": 1}})
    trainer = build_trainer(cfg, None, [])
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True
    assert trainer.strategy._start_method == "popen"


@pytest.mark.parametrize(("strategy", "reason"), [("ddp_spawn", "hands back only the weights"), ("fsdp", "shards")])
def test_strategies_training_cannot_keep_whole_are_refused_with_the_reason(strategy, reason):
    """ddp_spawn's parent kept 0 windows and empty metrics; FSDP shards what clipping, EMA and the
    adaptive weight's hook need whole. Both were accepted before."""
    from sdvae.config import ConfigError

    with pytest.raises(ConfigError, match=rf"train.strategy: {strategy} is not supported: .*{reason}.*use ddp"):
        config_from_dict({"train": {"strategy": strategy}})
