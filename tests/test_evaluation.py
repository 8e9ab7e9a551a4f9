"""Validation metrics: fp32 whatever the caller's autocast."""

import pytest
import torch

from sdvae.baseline import bicubic_roundtrip
from sdvae.evaluation import ReconstructionMetrics
from tests.conftest import to_tensor


def _scores(lpips_net, x, y, autocast: bool) -> dict:
    metrics = ReconstructionMetrics(lpips_net)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        metrics.update(x, y)
    return metrics.compute()


@pytest.mark.cpu_paths
def test_metrics_ignore_callers_bf16_autocast(lpips_net, photos):
    x = torch.cat([to_tensor(p, 128) for p in photos[:4]])
    y = bicubic_roundtrip(x, 4, 3)
    fp32 = _scores(lpips_net, x, y, autocast=False)
    under_bf16 = _scores(lpips_net, x, y, autocast=True)
    assert 0.3 < fp32["ssim"] < 0.95  # a real, imperfect reconstruction
    for key in ("ssim", "psnr", "lpips", "rec_loss"):
        assert under_bf16[key] == pytest.approx(fp32[key], rel=1e-6), key
