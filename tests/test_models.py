import json
from dataclasses import replace

import diffusers
import pytest
import torch
import torch.nn.functional as F

from sdvae.formats import load_any, save_diffusers
from sdvae.formats.ldm import ours_to_ldm, save_ldm
from sdvae.models import AutoencoderKL, AutoencoderKLConfig, NLayerDiscriminator, count_parameters
from sdvae.models.discriminator import NORM_TYPES
from sdvae.models.tiling import tiled_apply
from tests.conftest import to_tensor
from tests.tolerances import assert_fp32_close

REDUCED_SD = {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32}


def _diffusers_twin(cfg: AutoencoderKLConfig) -> diffusers.AutoencoderKL:
    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
    ).eval()


def test_preset_parameter_counts():
    assert count_parameters(AutoencoderKL.from_preset("sd-f8c4")) == 83_653_863
    assert count_parameters(AutoencoderKL.from_preset("ldm-kl-f4")) == 55_312_063


@pytest.mark.cpu_paths
@pytest.mark.parametrize(("preset", "overrides"), [("tiny", {}), ("sd-f8c4", REDUCED_SD)])
def test_diffusers_round_trip_both_ways(tmp_path, preset, overrides):
    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset(preset, **overrides).eval()
    save_diffusers(ours, tmp_path / "ours")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a = ours(x, sample_posterior=False)[0]
        b = theirs(x).sample
    assert torch.equal(a, b)  # the same ops in the same order: bit-identical

    torch.manual_seed(1)
    other = _diffusers_twin(ours.config)
    other.save_pretrained(tmp_path / "theirs")
    back = load_any(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.equal(back(x, sample_posterior=False)[0], other(x).sample)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("scaling_factor", "shift_factor", "force_upcast", "down_block_types", "latent_channels"):
        assert key in cfg


def test_ldm_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("ldm-kl-f4", block_out_channels=(32, 64, 64))
    ldm = ours_to_ldm(model.state_dict(), 3)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    save_ldm(model, tmp_path / "vae.safetensors", prefix="first_stage_model.")
    back = load_any(tmp_path / "vae.safetensors")
    assert back.config.block_out_channels == (32, 64, 64) and back.config.latent_channels == 3
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_ldm_checkpoint_with_loss_keys_via_torch_load(tmp_path):
    model = AutoencoderKL.from_preset("tiny")
    state = {f"first_stage_model.{k}": v for k, v in ours_to_ldm(model.state_dict(), 4).items()}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model.diffusion_model.x"] = torch.zeros(1)
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "model.ckpt")
    back = load_any(tmp_path / "model.ckpt", norm_num_groups=16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))


@pytest.mark.cpu_paths
def test_sliced_equals_unsliced():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        full = model.reconstruct(x)
        model.max_batch_size = 2
        sliced = model.reconstruct(x)
    assert_fp32_close(sliced, full, "batch 2 slices vs batch 5")  # other batch sizes pick other kernels


@pytest.mark.cpu_paths
def test_tile_blending_is_exact_for_local_maps():
    x = torch.rand(1, 3, 96, 160)
    down = tiled_apply(lambda t: F.avg_pool2d(t, 8), x, 32, 0.25, 1 / 8, 8)
    assert_fp32_close(down, F.avg_pool2d(x, 8), "tiled avg_pool")
    up = tiled_apply(lambda t: F.interpolate(t, scale_factor=8.0), x, 16, 0.25, 8, 1)
    assert_fp32_close(up, F.interpolate(x, scale_factor=8.0), "tiled upsample")


def test_tiled_model_output_shapes_and_any_size():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    model.tile_size = 32
    x = torch.rand(1, 3, 50, 77) * 2 - 1
    y = model.reconstruct(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    model.tile_size = 256  # larger than the image: identical to the untiled path
    z = model.reconstruct(x)
    model.tile_size = None
    assert torch.equal(z, model.reconstruct(x))


def test_encode_requires_multiple_of_factor():
    model = AutoencoderKL.from_preset("tiny")
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 30, 32))


@pytest.mark.cpu_paths
def test_latent_api_scaling_and_shift():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", scaling_factor=0.5, shift_factor=0.1).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = model.encode_to_latent(x)
        assert_fp32_close(lat, (model.encode(x).mode() - 0.1) * 0.5, "scaled latent")
        assert_fp32_close(model.decode_from_latent(lat), model.decode(model.encode(x).mode()), "decoded latent")


@pytest.mark.cpu_paths
def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model(x, sample_posterior=False)[0].square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing(True)
    model(x, sample_posterior=False)[0].square().mean().backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        assert_fp32_close(p.grad, a, "checkpointed gradient")


def test_posterior_logvar_clamped_and_kl():
    from sdvae.models import DiagonalGaussianDistribution

    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)], dim=1)
    post = DiagonalGaussianDistribution(moments)
    assert post.logvar.min().item() == -30.0
    std_normal = DiagonalGaussianDistribution(torch.zeros(2, 8, 2, 2))
    assert torch.allclose(std_normal.kl(), torch.zeros(2))


@pytest.mark.parametrize("norm", NORM_TYPES)
def test_discriminator_shapes(norm):
    d = NLayerDiscriminator(3, 16, 3, norm)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    if not norm.startswith("spectral"):
        assert abs(convs[0].weight.std().item() - 0.02) < 0.01


def test_bad_architecture_errors():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        AutoencoderKL.from_preset("tiny", norm_num_groups=32, block_out_channels=(16, 32))
    with pytest.raises(ValueError, match="unknown preset 'xl'"):
        AutoencoderKL.from_preset("xl")
    with pytest.raises(ValueError, match="norm_type 'layer'"):
        NLayerDiscriminator(norm_type="layer")


def test_save_is_atomic_over_existing(tmp_path):
    model = AutoencoderKL.from_preset("tiny")
    save_diffusers(model, tmp_path / "vae")
    save_diffusers(model, tmp_path / "vae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_scaled_residual_init_makes_residual_blocks_identity_and_keeps_layout():
    from sdvae.models.blocks import ResnetBlock2D
    from sdvae.models.init import initialize

    torch.manual_seed(0)
    default = AutoencoderKL.from_preset("tiny")
    scaled = initialize(AutoencoderKL.from_preset("tiny"), "scaled_residual")
    assert default.state_dict().keys() == scaled.state_dict().keys()
    x = torch.randn(2, 32, 16, 16)
    block = scaled.encoder.down_blocks[0].resnets[0]
    assert isinstance(block, ResnetBlock2D)
    assert torch.equal(block(x), x)  # zeroed residual branch: the block starts as the identity
    attn = scaled.encoder.mid_block.attentions[0]
    h = torch.randn(2, attn.to_q.in_features, 4, 4)
    assert torch.equal(attn(h), h)
    w = scaled.decoder.conv_in.weight
    assert abs(float(w.std()) * w[0].numel() ** 0.5 - 1.0) < 0.1  # variance-preserving
    # The default init shrinks the signal along the encoder's plain path; the scaled one keeps it.
    img = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        spread = {name: float(m.encode(img).mean.std()) for name, m in (("default", default), ("scaled", scaled))}
    assert spread["scaled"] > 2 * spread["default"], spread


@pytest.mark.parametrize("preset_overrides", [{}, {"use_quant_conv": False}])
def test_init_logvar_starts_the_posterior_near_the_given_log_variance(preset_overrides):
    """Any input, either moment-producing conv: the posterior starts at the chosen log-variance,
    while the means (the other half of the same conv) are untouched."""
    from sdvae.config import ModelConfig
    from sdvae.models.factory import build_autoencoder

    cfg = ModelConfig(preset="tiny", init="scaled_residual", **preset_overrides)
    torch.manual_seed(0)
    plain = build_autoencoder(cfg, 64)
    torch.manual_seed(0)
    low = build_autoencoder(replace(cfg, init_logvar=-6.0), 64)
    img = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = plain.encode(img), low.encode(img)
    assert float((b.logvar + 6.0).abs().max()) < 0.1
    assert torch.equal(a.mean, b.mean)
    assert float(b.std.max()) < 0.06  # the sampled latent is now mostly signal, not unit noise
    assert float(a.logvar.abs().mean()) < 2.0  # against the plain start near 0


def test_unknown_init_scheme_is_rejected():
    from sdvae.models.init import initialize

    with pytest.raises(ValueError, match="allowed: pytorch, scaled_residual"):
        initialize(AutoencoderKL.from_preset("tiny"), "orthogonal")  # type: ignore[arg-type]


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_exports_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    """safetensors and mkstemp create 0600 files; a shared model folder must be readable as the umask says."""
    import os
    import stat

    old = os.umask(umask)
    try:
        save_diffusers(AutoencoderKL.from_preset("tiny", block_out_channels=(16,), norm_num_groups=8), tmp_path / "vae")
        save_ldm(AutoencoderKL.from_preset("tiny", block_out_channels=(16,), norm_num_groups=8), tmp_path / "v.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "vae").stat().st_mode) == dir_mode
    for p in [*(tmp_path / "vae").iterdir(), tmp_path / "v.ckpt"]:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p


# The published vae/config.json of each family (stabilityai/sdxl-vae, stable-diffusion-3-medium,
# black-forest-labs/FLUX.1): what a user's downloaded folder says, typed out independently.
PUBLISHED = {
    "sdxl-f8c4": {"latent_channels": 4, "scaling_factor": 0.13025, "sample_size": 1024, "force_upcast": True},
    "sd3-f8c16": {
        "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
        "scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024, "force_upcast": True,
    },
    "flux-f8c16": {
        "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024, "force_upcast": True,
    },
}  # fmt: skip
SD_LAYOUT = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_family_presets_equal_the_published_diffusers_configs(preset):
    published = {**SD_LAYOUT, **PUBLISHED[preset]}
    theirs = diffusers.AutoencoderKL(**published)
    ours = AutoencoderKL.from_preset(preset)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    assert count_parameters(ours) == count_parameters(theirs)
    for key, value in PUBLISHED[preset].items():
        assert getattr(ours.config, key) == value, key
        assert theirs.config[key] == value, key


@pytest.mark.cpu_paths
@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_family_presets_forward_bit_identical_to_diffusers(tmp_path, preset):
    """At reduced widths (the rest of the preset as published), through diffusers' own loader."""
    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset(preset, **REDUCED_SD).eval()
    save_diffusers(ours, tmp_path / "ours")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.latent_channels == PUBLISHED[preset]["latent_channels"]
    assert theirs.config.shift_factor == PUBLISHED[preset].get("shift_factor")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x, sample_posterior=False)[0], theirs(x).sample)


def test_a_decoder_only_fine_tune_ships_the_latent_factors_it_started_from():
    from sdvae.scaling import shipped_factors

    flux = AutoencoderKL.from_preset("flux-f8c16").config
    stats = {"scaling_factor": 2.5, "shift_factor": -0.2, "images": 64}
    kept, why = shipped_factors(flux, stats, encoder_trained=False)
    assert (kept.scaling_factor, kept.shift_factor, kept.force_upcast) == (0.3611, 0.1159, flux.force_upcast)
    assert "decoder-only" in why
    fresh, why = shipped_factors(flux, stats, encoder_trained=True)
    assert (fresh.scaling_factor, fresh.shift_factor) == (2.5, -0.2) and "computed" in why
    # SD-style families carry no shift: a full fine-tune recomputes the scale only
    sdxl = AutoencoderKL.from_preset("sdxl-f8c4").config
    fresh, _ = shipped_factors(sdxl, stats, encoder_trained=True)
    assert (fresh.scaling_factor, fresh.shift_factor, fresh.force_upcast) == (2.5, None, True)


@pytest.mark.cpu_paths
def test_latent_statistics_give_the_scale_and_shift_that_standardise_the_latents(photos):
    from sdvae.scaling import latent_statistics

    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    x = torch.cat([to_tensor(p, 32) for p in photos])
    stats = latent_statistics(model, [x[:3], x[3:]], seed=0)
    with torch.no_grad():
        z = model.encode(x).sample(torch.Generator().manual_seed(0)).double()
    standardised = (z - stats["shift_factor"]) * stats["scaling_factor"]
    assert abs(float(standardised.mean())) < 1e-6 and abs(float(standardised.std(correction=0)) - 1) < 1e-6
    assert stats["images"] == 6 and len(stats["channel_mean"]) == 16


def test_diffusers_spelling_from_pretrained_and_save_pretrained(tmp_path):

    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    folder = model.save_pretrained(tmp_path / "vae")
    assert diffusers.AutoencoderKL.from_pretrained(folder).config.latent_channels == 4
    back = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))
