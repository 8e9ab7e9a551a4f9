"""`sdvae convert` and the single file export writes: exact round trips, clear refusals, and
compatibility checked against diffusers' own loaders and pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdvae.cli import main
from sdvae.convert import ConversionError, convert
from sdvae.formats import load_any
from sdvae.formats.diffusers import WEIGHTS_NAME, save_diffusers
from sdvae.formats.ldm import save_ldm, single_file_metadata
from sdvae.models.autoencoder_kl import AutoencoderKL
from tests.conftest import to_tensor
from tests.tolerances import assert_fp32_close

# small stand-ins with each family's layout and factors
FAMILIES = {
    "sd-f8c4": {},
    "sdxl-f8c4": {"scaling_factor": 0.13025, "force_upcast": True},
    "flux-f8c16": {
        "latent_channels": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    },
}


def stand_in(family: str, seed: int = 0, groups: int = 8) -> AutoencoderKL:
    """`groups=32` for files from elsewhere, which carry no config: every SD-family VAE has 32."""
    torch.manual_seed(seed)
    widths = (16, 32) if groups == 8 else (32, 64)
    return AutoencoderKL.from_preset("tiny", block_out_channels=widths, norm_num_groups=groups, **FAMILIES[family])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folder_to_single_file_to_folder_is_bit_identical_in_fp32(family, tmp_path):
    save_diffusers(stand_in(family), tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "vae.safetensors")
    keys = set(load_file(str(tmp_path / "vae.safetensors")))
    assert "encoder.down.0.block.0.norm1.weight" in keys and not any(k.startswith("first_stage_model.") for k in keys)
    assert ("quant_conv.weight" in keys) == (family != "flux-f8c16")  # none where the model has none
    convert(tmp_path / "vae.safetensors", tmp_path / "b")
    assert (tmp_path / "a/config.json").read_bytes() == (tmp_path / "b/config.json").read_bytes()
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_NAME)), load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = load_any(tmp_path / "vae.safetensors")  # our own file rebuilds without any preset
    assert back.config == load_any(tmp_path / "a").config


def test_a_whole_checkpoint_gives_up_its_vae_and_files_from_elsewhere_take_their_family(tmp_path):
    model = stand_in("sdxl-f8c4", groups=32)
    save_ldm(model, tmp_path / "ckpt.safetensors", prefix="first_stage_model.")
    state = load_file(str(tmp_path / "ckpt.safetensors"))
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)  # a UNet beside it
    save_file(state, str(tmp_path / "ckpt.safetensors"))  # tensors only, as files from elsewhere come
    convert(tmp_path / "ckpt.safetensors", tmp_path / "vae", preset="sdxl-f8c4")
    got = load_any(tmp_path / "vae")
    assert (got.config.scaling_factor, got.config.force_upcast) == (0.13025, True)  # SDXL's, from --preset
    assert all(torch.equal(got.state_dict()[k], v) for k, v in model.state_dict().items())


def test_refusals_are_one_clear_line_and_write_nothing(tmp_path, capsys):
    save_diffusers(stand_in("flux-f8c16"), tmp_path / "c16")
    save_file({"unet.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    cases = [
        (["convert", str(tmp_path / "unet.safetensors"), str(tmp_path / "x")], "no LDM autoencoder"),
        (["convert", str(tmp_path / "c16"), str(tmp_path / "taken.safetensors")], "exists; pass --overwrite"),
        (["convert", str(tmp_path / "c16"), str(tmp_path / "v.ckpt")], "safetensors only"),
        (["convert", str(tmp_path / "c16"), str(tmp_path / "y"), "--preset", "sd-f8c4"], "carries its own config"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "v.ckpt").exists()
    # a bare file from elsewhere with 16 channels is not SD's family
    save_ldm(stand_in("flux-f8c16", groups=32), tmp_path / "ae.safetensors")
    save_file(load_file(str(tmp_path / "ae.safetensors")), str(tmp_path / "ae.safetensors"))
    assert main(["convert", str(tmp_path / "ae.safetensors"), str(tmp_path / "z"), "--preset", "sd-f8c4"]) == 2
    assert "is not of that family: latent_channels=16" in capsys.readouterr().err


def test_fp16_is_refused_where_decoding_overflows_and_written_where_it_does_not(tmp_path):
    save_diffusers(stand_in("sd-f8c4"), tmp_path / "ok")
    convert(tmp_path / "ok", tmp_path / "ok16.safetensors", dtype="fp16")
    tensors = load_file(str(tmp_path / "ok16.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert single_file_metadata(tmp_path / "ok16.safetensors")["sdvae_config"]["latent_channels"] == 4
    hot = stand_in("sd-f8c4")
    with torch.no_grad():
        hot.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504
    save_diffusers(hot, tmp_path / "hot")
    with pytest.raises(ConversionError, match="fp16 refused: decoding in fp16 overflows"):
        convert(tmp_path / "hot", tmp_path / "hot16.safetensors", dtype="fp16")
    assert not (tmp_path / "hot16.safetensors").exists()
    convert(tmp_path / "hot", tmp_path / "hot_bf16.safetensors", dtype="bf16")  # bf16 has fp32's range


@pytest.mark.cpu_paths
def test_diffusers_from_single_file_reconstructs_as_the_folder_does(tmp_path, photos, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_diffusers(stand_in("sd-f8c4"), tmp_path / "vae", also=lambda d: save_ldm(load_any(d), d / "sdvae.safetensors"))
    single = diffusers.AutoencoderKL.from_single_file(
        str(tmp_path / "vae/sdvae.safetensors"), config=str(tmp_path / "vae")
    )
    folder = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    x = torch.cat([to_tensor(p, 32) for p in photos[:2]])
    with torch.no_grad():
        a = single(x, sample_posterior=False).sample
        b = folder(x, sample_posterior=False).sample
    assert_fp32_close(a, b, "from_single_file vs from_pretrained")


def test_a_diffusers_dit_pipeline_runs_on_our_export_unchanged(tmp_path):
    """The pipeline a VAE serves: diffusers' DiTPipeline with a tiny random transformer on our
    latents' channels and our folder loaded by `AutoencoderKL.from_pretrained`. It must give images
    of the right size and decode with our scaling_factor (the same denoised latents, decoded by a
    copy whose factor is 1, reach the decoder multiplied by it)."""
    diffusers = pytest.importorskip("diffusers")
    model = stand_in("sd-f8c4")
    model.config = model.config.replace(scaling_factor=0.37)
    save_diffusers(model, tmp_path / "vae")
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()  # in training mode its label embedding drops classes at random
    seen = {}
    for name, factor in (("ours", None), ("unit", 1.0)):
        vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
        if factor is not None:
            vae.register_to_config(scaling_factor=factor)
        decode = vae.decode
        vae.decode = lambda z, *a, _d=decode, _n=name, **k: (seen.setdefault(_n, z.clone()), _d(z, *a, **k))[1]
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
        out = pipe(
            class_labels=[1, 3],
            num_inference_steps=3,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        side = 4 * model.downsample_factor  # the transformer's 4x4 latents, decoded by our VAE
        assert out.images.shape == (2, 3, side, side) and torch.isfinite(out.images).all()
    assert json.loads((tmp_path / "vae/config.json").read_text())["scaling_factor"] == 0.37
    torch.testing.assert_close(seen["ours"], seen["unit"] / 0.37, rtol=1e-6, atol=0)


def test_a_foreign_16_channel_file_without_preset_is_refused_not_given_sds_factors(tmp_path, capsys):
    """Before, BFL's ae.safetensors converted without --preset shipped scaling_factor 0.18215 and
    no shift. SD3 and FLUX files share the layout, so the refusal names both; with --preset it converts."""
    save_ldm(stand_in("flux-f8c16", groups=32), tmp_path / "ae.safetensors")
    save_file(load_file(str(tmp_path / "ae.safetensors")), str(tmp_path / "ae.safetensors"))  # no header
    assert main(["convert", str(tmp_path / "ae.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pass --preset" in err and "sd3-f8c16 or flux-f8c16" in err and not (tmp_path / "out").exists()
    convert(tmp_path / "ae.safetensors", tmp_path / "out", preset="flux-f8c16")
    c = load_any(tmp_path / "out").config
    assert (c.scaling_factor, c.shift_factor) == (0.3611, 0.1159)


def test_loading_our_single_file_with_other_groups_keeps_its_stored_statistics(tmp_path):
    from sdvae.formats.ldm import load_ldm

    model = stand_in("sdxl-f8c4")
    model.config = model.config.replace(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    save_ldm(model, tmp_path / "vae.safetensors")
    got = load_ldm(tmp_path / "vae.safetensors", norm_num_groups=8).config
    assert got.latents_mean == model.config.latents_mean and got.latents_std == model.config.latents_std
    assert got.force_upcast is True and got.sample_size == model.config.sample_size
