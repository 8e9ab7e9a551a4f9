"""The single files people download, in their exact key layouts, with diffusers' own single-file
conversion as the oracle: a full SD/SDXL checkpoint (`first_stage_model.*` beside the UNet and
text encoder), standalone LDM-key VAEs (`vae-ft-mse-840000-ema-pruned`, `sdxl_vae`), BFL's FLUX
`ae.safetensors` (bare LDM keys, 16 channels, no quant convs) and SD3's `first_stage_model.*`
with 16 channels. Reduced widths keep it fast; the layouts are the families' own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdvae.formats import load_any
from sdvae.formats.ldm import ours_to_ldm
from sdvae.models import AutoencoderKL

WIDTHS = {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32}
FAMILIES = {  # file name: (preset, key prefix, extra non-VAE tensors in the file)
    "sd15-full-checkpoint.safetensors": ("sd-f8c4", "first_stage_model.", True),
    "vae-ft-mse-840000-ema-pruned.safetensors": ("sd-f8c4", "", False),
    "sdxl_vae.safetensors": ("sdxl-f8c4", "", False),
    "sdxl-full-checkpoint.ckpt": ("sdxl-f8c4", "first_stage_model.", True),
    "ae.safetensors": ("flux-f8c16", "", False),
    "sd3-full-checkpoint.safetensors": ("sd3-f8c16", "first_stage_model.", True),
}


def _write(path, state: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 1}, path)
    else:
        save_file(state, str(path))


def _file_state(preset: str, prefix: str, extras: bool) -> tuple[AutoencoderKL, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset(preset, **WIDTHS).eval()
    state = {prefix + k: v.contiguous() for k, v in ours_to_ldm(model.state_dict(), 4).items()}
    if extras:  # what else a whole diffusion checkpoint holds
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
        state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
    return model, state


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_single_files_load_as_diffusers_converts_them(tmp_path, name):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    preset, prefix, extras = FAMILIES[name]
    model, state = _file_state(preset, prefix, extras)
    assert ("quant_conv.weight" in {k.removeprefix(prefix) for k in state}) == (preset in ("sd-f8c4", "sdxl-f8c4"))
    _write(tmp_path / name, state)
    ours = load_any(tmp_path / name).eval()
    assert ours.config.latent_channels == model.config.latent_channels
    assert ours.config.use_quant_conv == model.config.use_quant_conv

    config = {
        "block_out_channels": list(WIDTHS["block_out_channels"]),
        "norm_num_groups": 32,
        "layers_per_block": 2,
        "latent_channels": model.config.latent_channels,
        "use_quant_conv": model.config.use_quant_conv,
        "use_post_quant_conv": model.config.use_post_quant_conv,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    theirs = diffusers.AutoencoderKL(**config).eval()
    converted = convert_ldm_vae_checkpoint(state, config)
    theirs.load_state_dict(converted, strict=True)
    assert set(converted) == set(ours.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in ours.state_dict().items())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x, sample_posterior=False)[0], theirs(x).sample)


def test_a_file_that_holds_no_autoencoder_says_what_it_found(tmp_path):
    from sdvae.formats.ldm import NotAnAutoencoder

    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3), "lora_up.weight": torch.zeros(2)},
              str(tmp_path / "unet.safetensors"))  # fmt: skip
    with pytest.raises(NotAnAutoencoder, match=r"no LDM autoencoder .* found 2 tensors under \['lora_up', 'model'\]"):
        load_any(tmp_path / "unet.safetensors")
    torch.manual_seed(0)
    diffusers_layout = AutoencoderKL.from_preset("tiny").state_dict()
    save_file({k: v.contiguous() for k, v in diffusers_layout.items()}, str(tmp_path / "diffusion_model.safetensors"))
    with pytest.raises(NotAnAutoencoder, match="diffusers-layout VAE weights; load the folder"):
        load_any(tmp_path / "diffusion_model.safetensors")


def test_a_single_file_takes_its_latent_factors_from_the_family_preset(tmp_path):
    from sdvae.config import ConfigError, config_from_dict
    from sdvae.models.factory import with_family_factors

    _, state = _file_state("flux-f8c16", "", False)
    save_file(state, str(tmp_path / "ae.safetensors"))
    loaded = load_any(tmp_path / "ae.safetensors").config
    assert loaded.shift_factor is None  # nothing in the file says FLUX
    model = {"preset": "flux-f8c16", "block_out_channels": list(WIDTHS["block_out_channels"])}
    flux = with_family_factors(loaded, config_from_dict({"model": model}).model, "ae.safetensors")
    assert (flux.scaling_factor, flux.shift_factor, flux.latent_channels) == (0.3611, 0.1159, 16)
    sd3 = with_family_factors(loaded, config_from_dict({"model": {**model, "preset": "sd3-f8c16"}}).model, "ae")
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)
    with pytest.raises(ConfigError, match=r"train\.init_from ae: .*latent_channels=16.*set model\.preset"):
        with_family_factors(loaded, config_from_dict({"model": {**model, "preset": "sd-f8c4"}}).model, "ae")
