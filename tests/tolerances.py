"""How close two fp32 results of the same math must be when they may run through different kernels.

Batch size, CPU instruction set (AVX-512, AVX2, none) and GPU change which convolution and
reduction kernels run, so their sums are accumulated in another order: results agree to a few
ulps of the magnitudes summed, not bit for bit. Claims that are truly exact (state-dict round
trips, the same ops in the same order) use `torch.equal` instead.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-4  # relative to each expected element
FP32_ATOL_OF_SCALE = 1e-4  # absolute, as a share of the largest expected magnitude


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", scale_floor: float = 0.0) -> None:
    """`scale_floor`: the least magnitude the absolute tolerance is sized to. Gradients that are
    zero in exact arithmetic (an attention key bias) hold only round-off of the larger terms
    that cancelled, so they are compared at a floor set by the network's larger gradients."""
    scale = max(1e-12, scale_floor, float(expected.detach().abs().max()))
    torch.testing.assert_close(
        actual.detach().float(),
        expected.detach().float(),
        rtol=FP32_RTOL,
        atol=FP32_ATOL_OF_SCALE * scale,
        msg=lambda m: f"{what}: {m}" if what else m,
    )
