"""The adaptive GAN weight with one backward equals the reference two-pass formulation."""

import pytest
import torch

from sdvae.config import LossConfig
from sdvae.losses import VAEGANLoss, adaptive_gan_weight
from sdvae.models import AutoencoderKL, NLayerDiscriminator
from tests.conftest import to_tensor
from tests.cpu_kinds import needs_inductor_vector_isa
from tests.tolerances import assert_fp32_close


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.cpu_paths
@pytest.mark.parametrize("learn_logvar", [False, True])
def test_one_backward_matches_reference_gradients(lpips_net, photos, learn_logvar):
    torch.manual_seed(0)
    ae = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8).train()
    ae.enable_gradient_checkpointing(True)
    disc = NLayerDiscriminator(3, 8, 2, "group").requires_grad_(False)
    loss_fn = VAEGANLoss(LossConfig(learn_logvar=True, logvar_init=0.3, disc_weight=0.7), lpips_net)
    assert loss_fn.training and not lpips_net.training  # LPIPS stays in eval mode (no dropout)
    loss_fn.logvar.requires_grad_(learn_logvar)
    params = [*ae.parameters(), *([loss_fn.logvar] if learn_logvar else [])]
    x = torch.cat([to_tensor(p, 32) for p in photos[:2]])
    last = ae.decoder.conv_out.weight

    def forward():  # the same posterior noise both times
        xrec, post = ae(x, generator=torch.Generator().manual_seed(1))
        return xrec, post

    # reference: LDM's formulation, two autograd.grad passes then the full backward
    xrec, post = forward()
    rec, _, _ = loss_fn.reconstruction(x, xrec)
    nll = (rec / torch.exp(loss_fn.logvar) + loss_fn.logvar).sum() / x.shape[0]
    kl = post.kl().sum() / x.shape[0]
    g_loss = -disc(xrec).mean()
    weight = adaptive_gan_weight(nll, g_loss, last, 1e4)
    total = nll + 1e-6 * kl + weight * 0.7 * g_loss
    total.backward()
    ref = _grads(params)

    xrec, post = forward()
    terms = loss_fn.generator(x, xrec, post, disc(xrec), last)
    terms.backward.backward()
    ours = _grads(params)

    assert float(terms.logs["d_weight"]) == pytest.approx(float(weight) * 0.7, rel=1e-4)
    assert float(terms.loss) == pytest.approx(float(total), rel=1e-5)
    assert float(weight) > 0 and any(float(g.abs().max()) > 0 for g in ref)
    floor = 1e-3 * max(float(g.abs().max()) for g in ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_fp32_close(a, b, f"gradient {i}", scale_floor=floor)


@pytest.mark.cpu_paths
def test_the_equivariance_term_adds_its_gradient_beside_the_one_backward_surrogate(lpips_net, photos):
    """GAN on, LPIPS on, a learnable logvar, and EQ-VAE's pair (a 9x9 latent of the 16x16 one,
    rotated 90°): the surrogate plus the term give the gradients of the plain sum, the adaptive
    weight seeing the plain reconstruction only; the term's value follows its definition."""
    from sdvae.latent_transforms import LatentTransform

    torch.manual_seed(0)
    ae = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8).train()
    disc = NLayerDiscriminator(3, 8, 2, "group").requires_grad_(False)
    cfg = LossConfig(learn_logvar=True, logvar_init=0.3, disc_weight=0.7, equivariance=1.0, equivariance_weight=0.6)
    loss_fn = VAEGANLoss(cfg, lpips_net)
    params = [*ae.parameters(), loss_fn.logvar]
    x = torch.cat([to_tensor(p, 32) for p in photos[:2]])
    last = ae.decoder.conv_out.weight
    pair = LatentTransform((9, 9), quarter_turns=1)

    def forward():  # the same posterior noise both times, for both decodes
        xrec, post = ae(x, generator=torch.Generator().manual_seed(1))
        decoded = ae.decode(pair.latent(post.sample(torch.Generator().manual_seed(2))))
        return xrec, post, decoded, pair.image(x, (18, 18))

    xrec, post, decoded, target = forward()
    rec, _, _ = loss_fn.reconstruction(x, xrec)
    nll = (rec / torch.exp(loss_fn.logvar) + loss_fn.logvar).sum() / x.shape[0]
    g_loss = -disc(xrec).mean()
    weight = adaptive_gan_weight(nll, g_loss, last, 1e4)
    eq_rec = (target - decoded).abs() + 1.0 * lpips_net(target, decoded)
    eq = 0.6 * (eq_rec / torch.exp(loss_fn.logvar) + loss_fn.logvar).mean() * x[0].numel()
    total = nll + 1e-6 * post.kl().sum() / x.shape[0] + weight * 0.7 * g_loss + eq
    total.backward()
    ref = _grads(params)

    xrec, post, decoded, target = forward()
    terms = loss_fn.generator(x, xrec, post, disc(xrec), last)
    terms = terms.plus(loss_fn.equivariance(target, decoded, x[0].numel()), "eq_loss")
    terms.backward.backward()
    ours = _grads(params)

    assert float(terms.logs["eq_loss"]) == pytest.approx(float(eq), rel=1e-5)
    assert float(terms.loss) == pytest.approx(float(total), rel=1e-5)
    assert float(terms.logs["d_weight"]) == pytest.approx(float(weight) * 0.7, rel=1e-4)
    floor = 1e-3 * max(float(g.abs().max()) for g in ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_fp32_close(a, b, f"gradient {i}", scale_floor=floor)


@pytest.mark.cpu_paths
@pytest.mark.slow
@needs_inductor_vector_isa
def test_compiled_networks_give_eager_gradients(lpips_net, photos):
    """Every kernel-changing option is checked against fp32 eager before it may be a default:
    train.compile's gradients (encoder, decoder trunk, discriminator, LPIPS all compiled) match
    eager ones within the fp32 tolerance of tests/tolerances.py, on one step from identical
    weights and inputs, with gradient checkpointing on (as the trainer's compile test runs it).
    One step, not a trajectory: after several Adam steps, round-off differences grow by
    construction, so a trajectory tolerance is always one CPU kind away from failing."""
    import copy

    from sdvae.training.compiling import compile_for_training

    torch.manual_seed(0)
    ae = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8).train()
    ae.enable_gradient_checkpointing(True)
    disc = NLayerDiscriminator(3, 8, 2, "group")
    x = torch.cat([to_tensor(p, 32) for p in photos[:2]])
    grads, losses = [], []
    for compiled in (False, True):
        ae_i, disc_i, lp_i = copy.deepcopy(ae), copy.deepcopy(disc), copy.deepcopy(lpips_net)
        if compiled:
            compile_for_training(ae_i, disc_i, lp_i, "default")
        loss_fn = VAEGANLoss(LossConfig(), lp_i)
        disc_i.requires_grad_(False)
        xrec, post = ae_i(x, generator=torch.Generator().manual_seed(1))
        terms = loss_fn.generator(x, xrec, post, disc_i(xrec), ae_i.decoder.conv_out.weight)
        terms.backward.backward()
        disc_i.requires_grad_(True)
        d_loss, _ = loss_fn.discriminator(disc_i(x), disc_i(xrec.detach()))
        d_loss.backward()
        grads.append([p.grad for p in (*ae_i.parameters(), *disc_i.parameters())])
        losses.append({**terms.logs, "d_loss": d_loss.detach()})
    for key, eager in losses[0].items():
        assert_fp32_close(losses[1][key], eager, f"compiled {key}")
    floor = 1e-3 * max(float(g.abs().max()) for g in grads[0])
    for i, (a, b) in enumerate(zip(grads[1], grads[0], strict=True)):
        assert_fp32_close(a, b, f"compiled gradient {i}", scale_floor=floor)


def test_the_lowpass_term_weighs_a_colour_shift_and_not_texture():
    """`loss.lowpass_weight`: a shift of the whole image adds weight x its size per pixel, while
    texture whose 8-pixel blocks average out adds (nearly) nothing; partial blocks are covered."""
    loss = VAEGANLoss(LossConfig(perceptual_weight=0.0, lowpass_weight=2.0), None)
    plain = VAEGANLoss(LossConfig(perceptual_weight=0.0), None)
    x = torch.rand(2, 3, 20, 20)  # 20 = two whole 8-pixel blocks and a partial one
    shifted = x + 0.05
    rec, pixel, _ = loss.reconstruction(x, shifted)
    assert rec.shape == x.shape
    torch.testing.assert_close(rec, torch.full_like(rec, 0.05 * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixel, torch.tensor(0.05), atol=1e-5, rtol=0)  # logged: the plain term
    checker = torch.ones(2, 3, 16, 16)
    checker[..., ::2, :] = -1.0  # every 8x8 block's mean is 0
    base = torch.rand(2, 3, 16, 16)
    rec, _, _ = loss.reconstruction(base, base + 0.1 * checker)
    torch.testing.assert_close(rec, plain.reconstruction(base, base + 0.1 * checker)[0], atol=1e-5, rtol=0)
    xrec = shifted.clone().requires_grad_(True)
    loss.reconstruction(x, xrec)[0].sum().backward()
    assert torch.isfinite(xrec.grad).all() and (xrec.grad > 1.0).all()  # the shift is pushed harder than by L1 alone


def test_a_checkpoint_from_before_lecam_debiasing_resumes_with_its_anchors_as_they_were():
    """Its anchors are plain EMAs already. The missing update count used to default to 0, so the
    first window divided them by 1 - 0.99: anchors 100x too large."""
    from sdvae.config import config_from_dict
    from sdvae.models.factory import build_autoencoder
    from sdvae.training.module import VAEGANModule

    cfg = config_from_dict({"loss": {"lecam_weight": 0.1, "lecam_decay": 0.99, "disc_start": 0}})
    module = VAEGANModule(cfg, build_autoencoder(cfg.model, 64), None)
    state = {k: v.clone() for k, v in module.state_dict().items() if k != "loss.ema_updates"}
    state["loss.ema_real"], state["loss.ema_fake"] = torch.tensor(0.5), torch.tensor(-0.5)
    checkpoint = {
        "state_dict": state,
        "sdvae_counters": dict.fromkeys(("windows", "g_steps", "d_steps", "bad_steps", "micro"), 0),
    }
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    real, fake = torch.full((2, 1, 4, 4), 0.5), torch.full((2, 1, 4, 4), -0.5)
    _, logs = module.loss.discriminator(real, fake)
    # anchors stay 0.5 / -0.5 (one more EMA update of the same values): (0.5 + 0.5)^2 twice; with the
    # anchors 100x too large (-50 / 50) it came to 50.5^2 twice, about 5,100
    assert float(logs["lecam_reg"]) == pytest.approx(2.0, rel=1e-4)


def test_latent_noise_is_off_at_zero_and_scaled_per_sample_to_the_latent_spread():
    from sdvae.training.latent_noise import perturb_latents

    torch.manual_seed(0)
    z = torch.randn(64, 4, 8, 8) * torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1)
    assert perturb_latents(z, 0.0) is z
    noise = perturb_latents(z, 0.5) - z
    ratio = noise.std(dim=(0, 2, 3)) / z.std(dim=(0, 2, 3))  # follows each channel's spread
    # sigma ~ U(0, 0.5) per sample: the noise's std is 0.5 / sqrt(3) ~ 0.29 of the channel's
    assert torch.allclose(ratio, torch.full((4,), 0.5 / 3**0.5), rtol=0.15)
    per_sample = noise.std(dim=(1, 2, 3)) / z.std()
    assert per_sample.max() > 2 * per_sample.min()  # each sample its own scale, some near clean
