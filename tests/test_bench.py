"""The training-step benchmark's code path, on a tiny model: every variant runs and ratios are formed."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from train_step import bench_train_step


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
