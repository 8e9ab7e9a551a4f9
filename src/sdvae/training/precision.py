"""`train.precision: auto`: on a CPU, the precision whose training step measured faster here.

Why measure: CPU flags say which instructions exist, not which precision is faster for this model
on this machine. Measured with bench/speed/cpu_precision.py (tiny preset, 64 px, batch 8, GAN step):
bf16 autocast ran 1.69x faster than fp32 on an Intel Xeon with AMX (family 6 model 167) and
1.71x on an AMD EPYC with AVX512-BF16, but 0.71x on an Intel Xeon VM (family 6 model 207, as
reported) whose flags include AVX512-BF16 and AVX512-FP16 without AMX, and 0.31x where bf16 is
emulated (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`). So `auto` times the real step in fp32 and in bf16 autocast
(`step_timing`), weighs each phase by its share of the run, and takes bf16 only when it is
faster by `BF16_MARGIN`; fp32 otherwise, the safer choice. The answer is cached per machine and
workload (`timing_cache`), so reruns and resumes agree. This holds off Linux too: no flags needed.

CUDA GPUs that support bf16 (Ampere and later) use it without measuring: their bf16 tensor-core
throughput is a multiple of fp32's. Other accelerators (mps) keep fp32. Each process resolves on
its own machine: give multi-node runs one kind of machine, or an explicit precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BF16_MARGIN = 1.10  # bf16 must be at least this much faster per window
CPU_CANDIDATES = ("32", "bf16-mixed")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_without_measuring(requested: str, accelerator: str) -> str | None:
    """The precision when no timing is needed; None when `auto` must measure (on a CPU)."""
    if requested != "auto":
        return requested
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    if accelerator not in ("auto", "cpu"):
        return "32"
    return None


def window_seconds(phase_seconds: dict[str, float], shares: dict[str, float]) -> float:
    """Expected seconds per window over a run whose phases take `shares` of its windows."""
    return sum(phase_seconds[p] * s for p, s in shares.items() if s > 0)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    measured: bool  # decided by timing here (or read from this machine's cache of it)
    window_s: dict[str, float] = field(default_factory=dict)  # precision -> expected s per window
    from_cache: bool = False

    def as_record(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "measured": self.measured,
            "from_cache": self.from_cache,
            **{f"window_s_{p}": round(s, 6) for p, s in self.window_s.items()},
            **(
                {"speedup_bf16_over_fp32": round(self.window_s["32"] / self.window_s["bf16-mixed"], 4)}
                if {"32", "bf16-mixed"} <= set(self.window_s)
                else {}
            ),
        }


def choose(step_seconds: dict[str, dict[str, float]], shares: dict[str, float], from_cache: bool) -> PrecisionChoice:
    """bf16 only when its expected window is faster than fp32's by `BF16_MARGIN`."""
    per_window = {p: window_seconds(step_seconds[p], shares) for p in CPU_CANDIDATES}
    faster = per_window["32"] >= BF16_MARGIN * per_window["bf16-mixed"]
    return PrecisionChoice("bf16-mixed" if faster else "32", True, per_window, from_cache)


def precision_plugin(precision: str, device: torch.device) -> Any:
    """Lightning's plugin for a precision `auto` can resolve to: for a rank that must take rank 0's
    choice after the trainer was built with its own."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    if precision == "32":
        return Precision()
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", device.type)
    raise ValueError(f"rank 0 chose precision {precision!r}; only 32 and bf16-mixed are decided by timing")
