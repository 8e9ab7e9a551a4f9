"""Does a VAE's decoder survive fp16? SDXL's does not: activations past 65504 (fp16's largest
finite value) turn into inf and the image into NaN, which is why `sdxl-vae-fp16-fix` exists and
why diffusers decodes in fp32 when a config says `force_upcast: true`.

The decode runs twice on the same latents: in fp32 with every module's largest output magnitude
recorded (no overflow is possible there, so that is where fp16 would overflow), and in fp16,
counting non-finite outputs. A model that overflows keeps `force_upcast: true`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sdvae.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

FP16_MAX = 65504.0
PHOTO = "scikit-image astronaut"  # the default image of the checks made without training data


def _decode_with_peaks(model: AutoencoderKL, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    peaks: dict[str, float] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                finite = out[torch.isfinite(out)]
                peak = float(finite.abs().max()) if finite.numel() else float("inf")
                peaks[name] = max(peaks.get(name, 0.0), peak)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        out = model.decode(latents)
    finally:
        for h in handles:
            h.remove()
    return out, peaks


@torch.no_grad()
def fp16_decode_report(model: AutoencoderKL, latents: torch.Tensor) -> dict[str, Any]:
    """Largest activation of an fp32 decode (and where), and what an fp16 decode of it gives."""
    model = model.eval()
    ref, peaks = _decode_with_peaks(model, latents.float())
    where = max(peaks, key=lambda k: peaks[k])
    half = copy.deepcopy(model).half()
    out16, _ = _decode_with_peaks(half, latents.half())
    nonfinite = int((~torch.isfinite(out16)).sum())
    return {
        "latents": list(latents.shape),
        "max_abs_activation": peaks[where],
        "max_abs_activation_at": where,
        "fp16_max": FP16_MAX,
        "fp16_nonfinite_outputs": nonfinite,
        "fp16_max_abs_error": None if nonfinite else float((out16.float() - ref).abs().max()),
        "overflows_fp16": peaks[where] >= FP16_MAX or nonfinite > 0,
    }


def guarded_config(config: AutoencoderKLConfig, report: dict[str, Any]) -> AutoencoderKLConfig:
    """`force_upcast: true` whenever the fp16 decode overflowed; otherwise the config as it is."""
    return config.replace(force_upcast=True) if report["overflows_fp16"] else config


def fp16_decode_report_on_photo(model: AutoencoderKL, pixels: Any | None, resolution: int) -> dict[str, Any]:
    """The report for one photo (uint8 HWC; None: scikit-image's astronaut), short side resized
    to `resolution` and center-cropped: the check `sdvae info --model` and `sdvae convert` make."""
    import numpy as np

    from sdvae.data.datamodule import to_model_range
    from sdvae.data.images import center_crop, resize_short_side
    from sdvae.data.sources import skimage_photo

    pixels = np.asarray(skimage_photo("astronaut")) if pixels is None else pixels
    pixels = center_crop(resize_short_side(pixels, resolution), resolution)
    x = to_model_range(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None])
    with torch.no_grad():
        return fp16_decode_report(model.eval(), model.encode(x).mode())
