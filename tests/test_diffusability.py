"""The diffusability report and the equivariance regulariser's transforms, on planted answers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdvae.config import ConfigError, LossConfig, config_from_dict
from sdvae.latent_transforms import LatentTransform, draw_transform, resize
from sdvae.scoring.diffusability import DiffusabilityMetrics, dct_matrix, high_frequency_share
from sdvae.training.equivariance import EquivarianceSchedule
from tests.conftest import to_tensor


def _lpips_free(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))  # a stand-in distance: these tests check PSNR and spectra


def _photos(photos, side: int = 64) -> torch.Tensor:
    return torch.cat([to_tensor(p, side) for p in photos[:4]])


def test_dct_matrix_is_orthonormal_and_is_scipys_dct_ii():
    from scipy.fft import dct

    d = dct_matrix(12)
    assert torch.allclose(d @ d.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    v = torch.randn(12, dtype=torch.float64)
    assert torch.allclose(d @ v, torch.from_numpy(dct(v.numpy(), norm="ortho")), atol=1e-12)


@pytest.mark.parametrize(("cycles", "expected"), [(2, 0.0), (12, 1.0)])
def test_a_pure_cosine_is_all_low_or_all_high_frequency(cycles, expected):
    """On a 16-sample side, DCT row k is at k/16 of Nyquist: k = 2 is below half, k = 12 above."""
    n = 16
    i = torch.arange(n, dtype=torch.float64)
    row = torch.cos(math.pi * (2 * i + 1) * cycles / (2 * n))
    plane = row[None, :].expand(n, n)[None, None]
    assert float(high_frequency_share(plane)) == pytest.approx(expected, abs=1e-9)


def test_white_noise_raises_the_high_frequency_share_and_smoothing_lowers_it(photos):
    from sdvae.models import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8).eval()
    with torch.no_grad():
        z = model.encode(_photos(photos)).mode()
    noisy = z + 0.5 * z.std() * torch.randn_like(z)
    smooth = F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    share = {
        name: float(high_frequency_share(t).mean()) for name, t in (("z", z), ("noisy", noisy), ("smooth", smooth))
    }
    assert share["smooth"] < share["z"] < share["noisy"], share


def test_an_identity_codec_is_perfectly_equivariant(photos):
    """Latent = image (f = 1): a downscaled or rotated latent decodes to exactly the downscaled or
    rotated image."""
    x = _photos(photos)
    metrics = DiffusabilityMetrics()
    metrics.update(x, x.clone(), torch.arange(4), lambda z, size: z, _lpips_free)
    result = metrics.compute(None)
    assert result["scale_equivariance"]["psnr"]["mean"] == 100.0  # the cap: no error at all
    assert result["scale_equivariance"]["lpips"]["mean"] == 0.0
    assert result["rotation_equivariance"]["psnr"]["mean"] == 100.0
    assert result["ifid"]["value"] is None and result["ifid"]["why_none"]


def test_pixel_unshuffle_keeps_blocks_but_not_their_insides_under_rotation(photos):
    """Space-to-depth (f = 2) stores each 2x2 block's pixel order in channels: rotating the latent
    moves whole blocks but leaves that order unturned, so decode(rot90(z)) is not rot90(x).
    The figure sees it: far below the identity's exact 100 dB, and below its own plain round trip."""
    x = _photos(photos)
    metrics = DiffusabilityMetrics()
    metrics.update(x, F.pixel_unshuffle(x, 2), torch.arange(4), lambda z, size: F.pixel_shuffle(z, 2), _lpips_free)
    rotation = metrics.compute(None)["rotation_equivariance"]["psnr"]["mean"]
    assert rotation < 40.0


def test_bicubic_is_rotation_equivariant_to_within_rounding(photos):
    from sdvae.baseline import bicubic_down, bicubic_up

    x = _photos(photos)
    metrics = DiffusabilityMetrics()
    metrics.update(x, bicubic_down(x, 8, 4), torch.arange(4), bicubic_up, _lpips_free)
    plain = bicubic_up(bicubic_down(x, 8, 4), (64, 64))
    from sdvae.scoring.protocol import psnr_per_image, to_uint8

    expected = float(psnr_per_image(to_uint8(x), to_uint8(plain)).mean())
    assert metrics.compute(None)["rotation_equivariance"]["psnr"]["mean"] == pytest.approx(expected, abs=0.05)


def test_transform_pairs_resize_and_rotate_latent_and_image_alike():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    t = LatentTransform((4, 4), quarter_turns=3)
    assert torch.equal(t.latent(x), torch.rot90(resize(x, (4, 4)), 3, dims=(-2, -1)))
    assert t.image(x, (4, 4)).shape == (2, 3, 4, 4)
    assert torch.equal(LatentTransform((8, 8)).latent(x), x)  # same size, no turn: untouched


def test_draws_are_a_function_of_seed_and_step_within_their_ranges():
    cfg = LossConfig(equivariance=0.5, equivariance_scale=(0.25, 0.75))
    a, b = EquivarianceSchedule(cfg, 3, 8), EquivarianceSchedule(cfg, 3, 8)
    draws = [a.draw(g, (16, 12)) for g in range(400)]
    assert draws == [b.draw(g, (16, 12)) for g in range(400)]  # resumed runs, other ranks: the same
    assert draws != [EquivarianceSchedule(cfg, 4, 8).draw(g, (16, 12)) for g in range(400)]
    taken = [d for d in draws if d is not None]
    assert 150 < len(taken) < 250
    assert all(2 <= d.latent_size[0] <= 12 and 2 <= d.latent_size[1] <= 9 for d in taken)
    assert {d.quarter_turns for d in taken} == {0, 1, 2, 3}
    assert EquivarianceSchedule(LossConfig(), 3, 8).draw(0, (16, 16)) is None  # off by default


def test_the_drawn_size_never_decodes_below_what_lpips_can_score():
    g = torch.Generator().manual_seed(0)
    sizes = {draw_transform((4, 4), (0.25, 0.25), False, 8, g).latent_size for _ in range(20)}
    assert sizes == {(2, 2)}  # 4 x 0.25 = 1 latent pixel = 8 px; raised to 16 px


def test_a_bad_scale_range_names_the_key():
    with pytest.raises(ConfigError, match=r"loss\.equivariance_scale.*0 < min <= max <= 1"):
        config_from_dict({"loss": {"equivariance_scale": [0.8, 0.5]}})
    with pytest.raises(ConfigError, match=r"loss\.equivariance"):
        config_from_dict({"loss": {"equivariance": 1.5}})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, photos) -> tuple[Path, Path]:
    from sdvae.formats import save_diffusers
    from sdvae.models import AutoencoderKL

    root = tmp_path_factory.mktemp("diffusability")
    for i, arr in enumerate(photos):
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(arr).save(root / "images" / f"p{i}.png")
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8)
    return root / "images", save_diffusers(model, root / "vae")


def test_ifid_without_interpolation_is_rfid_on_its_code_path(tiny_folder):
    """alpha = 0 decodes each latent itself: the decodes are the reconstructions rFID scored, so
    iFID must equal rFID (up to the batch the decoder ran them in)."""
    from sdvae.scoring.run import ScoreOptions, score_models

    images, model = tiny_folder
    options = ScoreOptions(resolution=32, batch_size=4, workers=0, progress=False, ifid_alpha=0.0)
    result = score_models([("m", str(model)), ("bicubic", "bicubic")], f"folder:{images}", options)
    for label in ("m", "bicubic"):
        entry = result["models"][label]
        assert entry["latent"]["ifid"]["n"] == entry["rfid"]["n"] == 6
        assert entry["latent"]["ifid"]["value"] == pytest.approx(entry["rfid"]["value"], rel=1e-3)
    halfway = score_models(
        [("m", str(model))], f"folder:{images}", ScoreOptions(resolution=32, workers=0, progress=False)
    )["models"]["m"]["latent"]["ifid"]
    assert halfway["alpha"] == 0.5 and halfway["value"] != pytest.approx(result["models"]["m"]["rfid"]["value"])


def test_a_resolution_the_latent_cannot_tile_is_skipped_with_its_reason(tiny_folder):
    """33 px on a 2x model: the latent is of a padded image, so no pair lines up; bicubic, whose
    "decoder" takes any size, keeps its figures. Without Inception iFID says why it is missing."""
    from sdvae.scoring.run import ScoreOptions, score_models

    images, model = tiny_folder
    options = ScoreOptions(resolution=33, workers=0, progress=False, inception=False)
    result = score_models([("m", str(model)), ("bicubic", "bicubic")], f"folder:{images}", options)
    assert result["models"]["m"]["latent"] == {"skipped": "resolution 33 is not a multiple of 2"}
    bicubic = result["models"]["bicubic"]["latent"]
    assert bicubic["rotation_equivariance"]["psnr"]["n"] == 6 and bicubic["ifid"]["value"] is None
    assert "Inception" in bicubic["ifid"]["why_none"]


def test_a_scaled_pair_under_16_px_gets_psnr_but_no_lpips():
    def no_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise AssertionError("LPIPS-VGG cannot score an 8 px image")

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    metrics = DiffusabilityMetrics()
    metrics.update(x, x.clone(), torch.arange(2), lambda z, size: z, no_lpips)
    scale = metrics.compute(None)["scale_equivariance"]
    assert scale["psnr"]["n"] == 2 and scale["lpips"]["n"] == 0
