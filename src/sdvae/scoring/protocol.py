"""The per-image metrics of published VAE tables, on 8-bit images.

Reconstructions are rounded to 8 bits first (what a saved PNG holds), so a score never credits
precision nobody can store, and scoring PNG dumps gives exactly the same numbers. PSNR and the
two SSIMs are per image on [0, 1] and then averaged, as LDM, skimage and the reference eval
scripts do (torchmetrics' default pools the MSE of all images, 1.2 dB off on our eval set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # an exact reconstruction would be +inf; the cap keeps the mean finite
SSIM_K1, SSIM_K2 = 0.01, 0.03
GAUSSIAN_SIGMA, GAUSSIAN_TAPS = 1.5, 11  # Wang et al. 2004 (skimage gaussian_weights=True: truncate 3.5)
UNIFORM_TAPS = 7  # skimage's default window, with the sample covariance

PROTOCOL = {
    "view": "short side resized to R (Pillow bicubic, antialiased), center crop R x R, 8-bit RGB",
    "reconstruction": "decoded from the posterior mode (or a seeded sample), clamped, rounded to 8 bits",
    "psnr": "per image on [0, 1] (data range 1), then mean / std; capped at 100 dB",
    "ssim_gaussian": "per image, 11-tap Gaussian window sigma 1.5, population covariance, K1 0.01, K2 0.03, "
    "mean over the valid region and channels (skimage gaussian_weights=True)",
    "ssim_uniform": "per image, 7x7 uniform window, sample covariance (skimage's default)",
    "lpips": "LPIPS-VGG v0.1 per image on [-1, 1], then mean / std",
    "rfid": "Frechet distance of InceptionV3 pool3 (2048-d, torch-fidelity weights 2015-12-05) features of the "
    "8-bit originals and reconstructions, resized to 299 as torch-fidelity does; reliable from 2048 images",
    "kid": "unbiased polynomial-kernel MMD (degree 3, gamma 1/2048, coef 1) of the same features, mean / std over "
    "100 subsets of min(1000, N) images",
}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded to nearest (as a PNG writer does)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 -> floats on [0, 1]."""
    return x.to(dtype) / 255.0


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of uint8 NCHW batches on [0, 1]."""
    mse = (to_unit(a) - to_unit(b)).pow(2).mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(1.0 / mse)).clamp(max=PSNR_CAP_DB)


def _gaussian_taps() -> torch.Tensor:
    radius = GAUSSIAN_TAPS // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(x**2) / (2 * GAUSSIAN_SIGMA**2))
    return taps / taps.sum()


def _filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable filter over each channel, valid region only (the part skimage keeps)."""
    c, k = x.shape[1], taps.numel()
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k).to(x), groups=c)
    return F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1).to(x), groups=c)


def _ssim(a: torch.Tensor, b: torch.Tensor, taps: torch.Tensor, sample_covariance: bool) -> torch.Tensor:
    """In float32 (float64 convolutions are several times slower on CPUs): within 3e-6 of
    skimage's float64 on photos with flat patches, where the variance terms cancel most."""
    x, y = to_unit(a, torch.float32), to_unit(b, torch.float32)
    n = taps.numel() ** 2
    correction = n / (n - 1) if sample_covariance else 1.0
    mx, my = _filter(x, taps), _filter(y, taps)
    vx = correction * (_filter(x * x, taps) - mx * mx)
    vy = correction * (_filter(y * y, taps) - my * my)
    cxy = correction * (_filter(x * y, taps) - mx * my)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.to(torch.float64).mean(dim=(1, 2, 3))


def ssim_gaussian(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM with the Gaussian window of Wang et al. (2004), uint8 NCHW inputs."""
    return _ssim(a, b, _gaussian_taps(), sample_covariance=False)


def ssim_uniform(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM with skimage's default 7x7 uniform window and sample covariance."""
    return _ssim(a, b, torch.full((UNIFORM_TAPS,), 1.0 / UNIFORM_TAPS, dtype=torch.float64), sample_covariance=True)
