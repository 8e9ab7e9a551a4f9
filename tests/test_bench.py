"""The training-step benchmark's code path, on a tiny model: every variant runs and ratios are formed."""

import sys
from pathlib import Path

import torch

from sdvae.config import config_from_dict

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "bench" / g) for g in ("common", "speed", "quality", "gpu")]

from train_step import bench_train_step

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_runs_each_variant(lpips_net):
    row = bench_train_step(
        "tiny",
        lpips_net,
        2,
        32,
        1,
        torch.device("cpu"),
        variants=("diffusers", "ours_reference", "ours_one_backward"),
        block_out_channels=(16, 32),
        norm_num_groups=8,
    )
    assert row["best_option"] in ("ours_reference", "ours_one_backward")
    assert row["ratio_ours_over_diffusers"] > 0 and row["diffusers_images_per_s"] > 0
    assert set(row) >= {"ratio_ours_one_backward_over_diffusers", "ratio_ours_reference_over_diffusers"}


def test_convergence_recipes_apply_to_the_base_params_and_summarize_over_seeds():
    import yaml

    from convergence import RECIPES, recipe_config, summarize

    base = yaml.safe_load((ROOT / "bench/quality/convergence_base.yaml").read_text())
    cfg = recipe_config(base, RECIPES["logvar_-6_lpips_0.25"], seed=2, steps=1200)
    assert (cfg.model.init_logvar, cfg.loss.perceptual_weight, cfg.train.seed) == (-6.0, 0.25, 2)
    # the GAN keeps its share of a longer run: 650 of 800 windows -> 975 of 1200
    assert (cfg.train.max_steps, cfg.loss.disc_start) == (1200, 975)
    # the default in params.yaml is the recipe the bench measured, nothing tuned beside it
    params = config_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())).to_dict()
    measured = recipe_config(base, RECIPES["auto_precision"], seed=0, steps=1600).to_dict()
    # except the run's length: the bench runs every recipe for plan_steps windows, the default plans
    # its windows to its budget on the machine at hand (same schedule, scaled)
    length = ("max_steps", "time_budget_s", "plan_steps")
    assert (params["train"]["max_steps"], params["train"]["plan_steps"]) == (None, 1600)
    measured["train"].update({k: params["train"][k] for k in length})
    for section in ("data", "model", "loss", "discriminator", "train"):
        assert params[section] == measured[section], section
    runs = [
        {
            "recipe": "r",
            "steps": 10,
            "seed": s,
            "overrides": {},
            "loader": "current",
            "final": {"lpips": lp, "psnr": ps, "ssim": 0.5, "train_s": 1},
        }
        for s, lp, ps in ((0, 0.40, 20.0), (1, 0.44, 19.0))
    ]
    legacy = {**runs[0], "final": {**runs[0]["final"], "lpips": 0.5}}
    del legacy["loader"]  # runs cached before the loader fix carry no key: they used the legacy loader
    summary = summarize([*runs, legacy], {"lpips": 0.43, "psnr": 19.5, "ssim": 0.6})
    assert summary["r/legacy_loader@10"]["seeds"] == [0] and summary["r/legacy_loader@10"]["lpips"] == 0.5
    row = summary["r@10"]
    assert (row["lpips"], row["lpips_spread"], row["psnr"], row["psnr_spread"]) == (0.42, 0.04, 19.5, 1.0)
    assert row["beats_bicubic"] == {"lpips": True, "psnr": False, "ssim": False}


def test_a_cached_run_stays_valid_when_an_option_is_added_off():
    """Runs cached before a params key existed count for the base that has it at its default
    (the same configuration), not for one that turns it on, and never when a key was removed."""
    import copy

    import yaml

    from convergence import same_base

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = copy.deepcopy(base)
    del before["loss"]["lowpass_weight"], before["train"]["encoder_lr_scale"]
    assert same_base(before, config_from_dict(base))
    on = copy.deepcopy(base)
    on["loss"]["lowpass_weight"] = 1.0
    assert not same_base(before, config_from_dict(on))
    removed = copy.deepcopy(base)
    removed["loss"]["no_longer_a_key"] = 1.0
    assert not same_base(removed, config_from_dict(base))


def test_per_image_diagnosis_finds_a_planted_colour_shift(tmp_path):
    import numpy as np
    from PIL import Image

    from per_image import rows_for

    rng = np.random.default_rng(0)
    for sub in ("originals", "models_vae", "bicubic"):
        (tmp_path / sub).mkdir()
    flat = np.full((16, 16, 3), 100, np.uint8)
    busy = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for i, (name, x) in enumerate((("flat", flat), ("busy", busy))):
        file = f"{i:07d}_set__{name}.png"
        Image.fromarray(x).save(tmp_path / "originals" / file)
        Image.fromarray(x + np.array([10, 0, 0], np.uint8)).save(tmp_path / "models_vae" / file)  # red shifted
        Image.fromarray(x).save(tmp_path / "bicubic" / file)
    rows = rows_for(tmp_path, "models_vae", "bicubic")
    assert [r["image"] for r in rows] == ["flat", "busy"]  # smoothest first
    flat_row = rows[0]
    assert flat_row["colour_shift_share_of_mse"] == 1.0  # all its error is the mean colour
    assert flat_row["model_psnr"] == round(10 * np.log10(3 / (10 / 255) ** 2), 2)


def test_latent_inversion_fits_each_image_and_leaves_unused_channels_alone():
    """A decoder that draws only the first three latent channels, nearest-upsampled: the fitted
    latent reproduces the image it was made from, and the fourth channel, which the decoder
    ignores, keeps the encoder's value."""
    import torch.nn.functional as F

    from latent_inversion import invert, psnr

    def decode(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z[:, :3], scale_factor=2, mode="nearest")

    torch.manual_seed(0)
    z_true = torch.rand(2, 4, 8, 8) * 1.6 - 0.8
    x = decode(z_true)
    z0 = torch.zeros_like(z_true)
    z = invert(decode, z0, x, steps=300, lr=0.05)
    before, after = psnr(x, decode(z0)), psnr(x, decode(z))
    assert all(b < 15 for b in before)
    assert all(a > 40 for a in after)
    assert torch.equal(z[:, 3], z0[:, 3])
