"""`sdvae evaluate`: the published per-image protocol, checked against independent implementations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.baseline import bicubic_roundtrip
from sdvae.cli import main as cli
from sdvae.formats import load_any, save_diffusers, save_ldm
from sdvae.models import AutoencoderKL
from sdvae.scoring.protocol import psnr_per_image, ssim_gaussian, ssim_uniform, to_uint8
from sdvae.scoring.report import flat_metrics
from tests.conftest import to_tensor

RES = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos) -> Path:
    """Seven photos (an odd count, so two ranks get unequal shares) and one corrupt file among them."""
    root = tmp_path_factory.mktemp("scoring") / "images"
    root.mkdir()
    for i, arr in enumerate(photos):
        Image.fromarray(arr).save(root / f"p{i}.png")
    Image.fromarray(photos[0][::-1]).save(root / "p6.jpg", quality=90)
    (root / "p3b_truncated.jpg").write_bytes((root / "p6.jpg").read_bytes()[:500])
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8)
    return save_diffusers(model, tmp_path_factory.mktemp("model") / "vae")


def _pairs(photos: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([to_tensor(p, RES) for p in photos[:4]])
    return to_uint8(x), to_uint8(bicubic_roundtrip(x, 8, 4))


@pytest.mark.cpu_paths
def test_per_image_psnr_and_both_ssims_equal_skimage(photos):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = _pairs(photos)
    ours = {"psnr": psnr_per_image(a, b), "gauss": ssim_gaussian(a, b), "uniform": ssim_uniform(a, b)}
    for i in range(a.shape[0]):
        x, y = (t[i].permute(1, 2, 0).numpy() / 255.0 for t in (a, b))
        ref_gauss = structural_similarity(
            x, y, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert float(ours["psnr"][i]) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-4)
        assert float(ours["gauss"][i]) == pytest.approx(ref_gauss, abs=1e-4)
        assert float(ours["uniform"][i]) == pytest.approx(
            structural_similarity(x, y, channel_axis=2, data_range=1.0), abs=1e-4
        )
    assert 0.2 < float(ours["gauss"].mean()) < 0.95  # a real, imperfect reconstruction


@pytest.mark.cpu_paths
def test_lpips_with_cached_reference_features_equals_the_lpips_package(lpips_net, photos):
    from sdvae.scoring.perceptual import ReferenceLPIPS

    a, b = _pairs(photos)
    x, y = (t.float().div(127.5).sub(1.0) for t in (a, b))
    ref = ReferenceLPIPS(lpips_net)
    ref.set_reference(x)
    torch.testing.assert_close(ref.distances(y), lpips_net(x, y).flatten(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fid_and_kid_equal_torch_fidelity_on_the_same_png_folders(tmp_path, photos):
    """Our streaming sums and KID estimator against torch-fidelity reading the two PNG folders.
    Not in the CPU-path matrix: both sides run the same Inception kernels in one process, and
    1e-3 of FID is far above what kernel order moves features by (1e-6)."""
    import torch_fidelity

    from sdvae.metrics import inception_weights
    from sdvae.scoring.features import (
        FeatureStats,
        build_inception,
        frechet_distance,
        inception_features,
        kernel_inception_distance,
    )

    x = torch.cat([to_tensor(p, RES) for p in photos] + [to_tensor(p[::-1].copy(), RES) for p in photos])
    a, b = to_uint8(x), to_uint8(bicubic_roundtrip(x, 8, 4))
    for name, batch in (("real", a), ("fake", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(batch):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    weights = inception_weights()
    net = build_inception(weights)
    real, fake = FeatureStats(), FeatureStats()
    for stats, batch in ((real, a), (fake, b)):
        for part, index in zip(batch.split(5), torch.arange(len(batch)).split(5), strict=True):  # streamed
            stats.update(inception_features(net, part), index)
    r, f = real.compute(), fake.compute()
    ours_fid = frechet_distance(r, f)
    ours_kid = kernel_inception_distance(r["kid_features"], f["kid_features"], seed=2020)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "real"),
        input2=str(tmp_path / "fake"),
        fid=True,
        kid=True,
        kid_subset_size=ours_kid["subset_size"],
        feature_extractor_weights_path=str(weights),
        cuda=False,
        verbose=False,
        rng_seed=2020,
        save_cpu_ram=True,
    )
    assert ours_fid > 1.0
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours_kid["mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)


def _evaluate(*args: str) -> int:
    return cli(["evaluate", *args, "--workers", "0", "--accelerator", "cpu"])


@pytest.mark.slow
def test_cli_scores_models_on_the_same_images_and_lists_bad_ones(tiny_model, folder, tmp_path, capsys):
    ldm_file = tmp_path / "vae-ldm.safetensors"
    save_ldm(load_any(tiny_model), ldm_file, "first_stage_model.")
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    rc = _evaluate(
        str(tiny_model), str(ldm_file), "bicubic", str(tmp_path / "missing"),
        "--data", f"folder:{folder}", "--resolution", str(RES), "--batch-size", "3",
        "--out", str(out), "--grid", str(grid), "--save-images", str(tmp_path / "dump"),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"protocol", "versions", "models", "skipped"}
    assert result["images"] == 7 and [s["name"] for s in result["skipped"]] == ["p3b_truncated.jpg"]
    assert "unreadable or truncated" in result["skipped"][0]["reason"]
    assert "skipped model" in captured.err and "missing" in captured.err
    assert list(result["models"]) == [str(tiny_model), str(ldm_file), "bicubic"]
    diffusers_scores, ldm_scores = result["models"][str(tiny_model)], result["models"][str(ldm_file)]
    for key in ("psnr", "ssim_gaussian", "ssim_uniform", "lpips"):  # the same weights, two file formats
        assert diffusers_scores[key]["n"] == 7
        assert ldm_scores[key]["mean"] == pytest.approx(diffusers_scores[key]["mean"], rel=1e-6)
        assert set(diffusers_scores[key]) == {"mean", "std", "n"}
    assert diffusers_scores["rfid"]["n"] == 7 and diffusers_scores["rfid"]["reliable"] is False
    assert set(diffusers_scores["kid"]) >= {"mean", "std", "subset_size"}
    latents = diffusers_scores["latents"]
    assert latents["channels"] == 4 and len(latents["std"]) == 4
    assert latents["scaling_factor_of_modes"] == pytest.approx(1 / latents["overall_std"])
    assert diffusers_scores["sha256"] and result["models"]["bicubic"]["sha256"] is None
    assert "| bicubic |" in captured.out and "unreliable" in captured.out
    for label in (str(tiny_model), "bicubic"):  # the diffusability section, for a VAE and for bicubic
        latent = result["models"][label]["latent"]
        assert latent["scale_equivariance"]["psnr"]["n"] == latent["rotation_equivariance"]["psnr"]["n"] == 7
        assert 0 < latent["spectrum"]["latent_high_frequency_share"]["mean"] < 1
        assert latent["ifid"]["n"] == 7 and latent["ifid"]["value"] > 0
    assert "| rot90-eq. PSNR |" in captured.out
    assert Image.open(grid).height > 4 * RES  # input + three model rows, labelled
    dumped = sorted(p.name for p in (tmp_path / "dump" / "originals").iterdir())
    assert len(dumped) == 7 and len(list((tmp_path / "dump" / "bicubic").iterdir())) == 7
    # the dumped PNGs score the same as the run: reconstructions are scored as 8-bit images
    orig = np.stack([np.asarray(Image.open(tmp_path / "dump" / "originals" / n)) for n in dumped])
    rec = np.stack([np.asarray(Image.open(tmp_path / "dump" / "bicubic" / n)) for n in dumped])
    to_t = lambda arr: torch.from_numpy(arr).permute(0, 3, 1, 2)  # noqa: E731
    assert float(psnr_per_image(to_t(orig), to_t(rec)).mean()) == pytest.approx(
        result["models"]["bicubic"]["psnr"]["mean"], abs=1e-9
    )


@pytest.mark.slow
def test_a_diffusers_save_pretrained_folder_with_16_channels_and_no_quant_convs(folder, tmp_path, capsys):
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(
        block_out_channels=(16, 32), norm_num_groups=8, latent_channels=16, use_quant_conv=False,
        use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    theirs.save_pretrained(tmp_path / "flux-like")
    out = tmp_path / "r.json"
    rc = _evaluate(
        str(tmp_path / "flux-like"), "--data", f"folder:{folder}", "--resolution", "32", "--max-images", "3",
        "--sample", "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    scores = json.loads(out.read_text())["models"][str(tmp_path / "flux-like")]
    assert scores["latents"]["channels"] == 16 and scores["psnr"]["n"] == 3
    again = tmp_path / "again.json"
    _evaluate(str(tmp_path / "flux-like"), "--data", f"folder:{folder}", "--resolution", "32", "--max-images", "3",
              "--sample", "--out", str(again))  # fmt: skip
    assert json.loads(again.read_text())["models"][str(tmp_path / "flux-like")]["psnr"] == scores["psnr"]  # seeded


def test_nothing_to_score_is_one_clear_line(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _evaluate(str(tiny_model), "--data", f"folder:{tmp_path / 'empty'}") == 1
    assert "has no images" in capsys.readouterr().err
    not_a_model = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(not_a_model))
    assert _evaluate(str(not_a_model), "--data", f"folder:{tmp_path / 'empty'}") == 1
    err = capsys.readouterr().err
    assert "no model could be loaded" in err and "weights.safetensors" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_ddp_processes_give_the_figures_of_one(tiny_model, folder, tmp_path):
    """7 usable images on 2 gloo ranks (4 + 3, one skip on a rank): no image dropped or counted twice."""
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"r{devices}.json"
        cmd = [sys.executable, "-m", "sdvae.cli", "evaluate", str(tiny_model), "bicubic", "--data", f"folder:{folder}",
               "--resolution", "32", "--devices", str(devices), "--accelerator", "cpu", "--workers", "0",
               "--batch-size", "2", "--out", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert two["processes"] == 2 and one["images"] == two["images"] == 7
    assert [s["name"] for s in two["skipped"]] == ["p3b_truncated.jpg"]
    for label in one["models"]:
        for key in ("psnr", "ssim_gaussian", "ssim_uniform", "lpips"):
            assert two["models"][label][key]["n"] == 7
            # fp32 sums over other batch compositions (4 + 3 images on two ranks, 7 on one): the untrained
            # model's SSIM, ~0.03, came 3e-7 apart (1.0e-5 relative) on a 2-core Xeon, before this change too
            mean_one = one["models"][label][key]["mean"]
            assert two["models"][label][key]["mean"] == pytest.approx(mean_one, rel=1e-5, abs=1e-6), key
        assert two["models"][label]["rfid"]["value"] == pytest.approx(one["models"][label]["rfid"]["value"], rel=1e-4)
        assert two["models"][label]["kid"]["mean"] == pytest.approx(one["models"][label]["kid"]["mean"], rel=1e-4)
        latent_one, latent_two = (flat_metrics(r["models"][label]) for r in (one, two))
        assert set(latent_two) == set(latent_one) >= {"latent_scale_psnr", "latent_rotation_psnr", "ifid"}
        for key in ("latent_scale_psnr", "latent_scale_lpips", "latent_rotation_psnr", "latent_hf_share", "ifid"):
            assert latent_two[key] == pytest.approx(latent_one[key], rel=1e-4), key  # neighbours across ranks


def test_baseline_flags_each_metric_in_its_direction():
    from sdvae.scoring.report import better_than

    model = {"lpips": 0.2, "psnr": 25.0, "ssim_gaussian": 0.7, "rfid": None, "kid": 0.01}
    base = {"lpips": 0.3, "psnr": 26.0, "ssim_gaussian": 0.6, "rfid": 10.0, "kid": 0.02, "ssim_uniform": 0.5}
    assert better_than(model, base) == {
        "psnr": False, "ssim_gaussian": True, "ssim_uniform": None, "lpips": True, "rfid": None, "kid": True,
    }  # fmt: skip


@pytest.mark.cpu_paths
@pytest.mark.parametrize("images", [8, 400])  # rank-deficient (fewer images than features) and full rank
def test_trace_of_the_covariance_product_root_equals_scipy_sqrtm(images):
    from scipy import linalg

    from sdvae.scoring.features import trace_sqrt_product

    rng = np.random.default_rng(0)
    a = rng.standard_normal((images, 256))
    b = a @ rng.standard_normal((256, 256)) * 0.1 + rng.standard_normal((images, 256))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = float(np.trace(np.real(linalg.sqrtm(s1 @ s2))))
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-6)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("images", [(8, 8), (5, 40), (300, 300)])  # below the dimension, unequal sides
def test_the_trace_from_features_equals_the_trace_from_their_covariances(images):
    from sdvae.scoring.features import trace_sqrt_product, trace_sqrt_product_of_features

    rng = np.random.default_rng(1)
    a = rng.standard_normal((images[0], 512)) + 3.0
    b = rng.standard_normal((images[1], 512)) * 0.5
    b[: min(images)] += 0.7 * a[: min(images)]
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product_of_features(a, b) == pytest.approx(trace_sqrt_product(s1, s2), rel=1e-6)


def test_frechet_distance_takes_the_feature_route_only_with_every_images_features(monkeypatch):
    import torch

    import sdvae.scoring.features as features

    rng = np.random.default_rng(2)
    stats = []
    for n in (12, 9):
        f = torch.from_numpy(rng.standard_normal((n, features.FEATURES)).astype(np.float32)).double()
        s = features.FeatureStats()
        s.update(f, torch.arange(n))
        stats.append(s.compute())
    routes = []
    for name in ("trace_sqrt_product", "trace_sqrt_product_of_features"):
        real = getattr(features, name)
        monkeypatch.setattr(features, name, lambda *x, real=real, name=name: routes.append(name) or real(*x))
    by_features = features.frechet_distance(*stats)
    partial = {**stats[1], "kid_features": stats[1]["kid_features"][:5]}  # a capped KID sample: covariances
    by_covariances = features.frechet_distance(stats[0], partial)
    assert routes == ["trace_sqrt_product_of_features", "trace_sqrt_product"]
    assert by_features == pytest.approx(by_covariances, rel=1e-6)
