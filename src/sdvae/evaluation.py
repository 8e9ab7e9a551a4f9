"""Validation metrics during training: LPIPS (mean, std), PSNR, SSIM, L1; optional rFID.

A quick signal on a few eval images, logged as `val/*`: PSNR here is torchmetrics' default (one
PSNR of the MSE pooled over all images) and SSIM its Gaussian window on float reconstructions.
The published, per-image protocol on 8-bit images is `sdvae.scoring` (`sdvae evaluate`, the
evaluate stage). Inputs are in [-1, 1]. Every metric is a torchmetrics object, so state syncs across DDP ranks
and nothing holds more than running sums (FID keeps 2048x2048 covariance sums).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


class ReconstructionMetrics(nn.Module):
    """LPIPS mean/std, PSNR and SSIM on [0, 1] (data_range 1), L1; optional rFID."""

    def __init__(self, lpips_net: nn.Module | None, fid: Metric | None = None) -> None:
        super().__init__()
        self.lpips_net = lpips_net
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.l1 = MeanMetric()
        self.lpips_mean = MeanMetric()
        self.lpips_sq = MeanMetric()
        self.fid = fid

    @torch.no_grad()
    def update(self, x: torch.Tensor, xrec: torch.Tensor) -> None:
        """Accumulate one batch, always in fp32: under a caller's bf16 autocast SSIM's variance terms
        cancel catastrophically (0.56 instead of 0.72 on the same pairs) and LPIPS is bf16-rounded."""
        with torch.autocast(x.device.type, enabled=False):
            self._update_fp32(x, xrec)

    def _update_fp32(self, x: torch.Tensor, xrec: torch.Tensor) -> None:
        x, xrec = x.float().clamp(-1, 1), xrec.float().clamp(-1, 1)
        a, b = (x + 1) / 2, (xrec + 1) / 2
        self.psnr.update(b, a)
        self.ssim.update(b, a)
        self.l1.update((a - b).abs().mean(dim=(1, 2, 3)))
        if self.lpips_net is not None:
            d = self.lpips_net(x, xrec).flatten().float()
            self.lpips_mean.update(d)
            self.lpips_sq.update(d.pow(2))
        if self.fid is not None:
            self.fid.update(a, real=True)
            self.fid.update(b, real=False)

    def compute(self) -> dict[str, float | None]:
        out = {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
            "rec_loss": float(self.l1.compute()),
        }
        if self.lpips_net is not None:
            mean = float(self.lpips_mean.compute())
            out["lpips"] = mean
            out["lpips_std"] = max(0.0, float(self.lpips_sq.compute()) - mean**2) ** 0.5
        if self.fid is not None:
            # FID needs two samples per side for a covariance; with fewer it is undefined, not zero.
            enough = int(self.fid.real_features_num_samples) >= 2 and int(self.fid.fake_features_num_samples) >= 2
            out["rfid"] = float(self.fid.compute()) if enough else None
        return out
