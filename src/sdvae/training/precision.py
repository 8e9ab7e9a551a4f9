"""`train.precision: auto`: bf16 autocast where the hardware multiplies bf16 natively, else fp32.

On CPUs with AVX512-BF16 or AMX the tiny CPU default trains 1.3-1.4x faster per window in bf16
autocast with no loss of quality per window (bench/convergence.py, recipe `bf16`); CPUs without
them emulate bf16 and run the step at 0.45x (AVX-512) to 0.05x (AVX2) of fp32
(bench/cpu_precision.py), so they keep fp32. CUDA GPUs that support bf16 (Ampere and later) use
it. Each process resolves on its own machine: give multi-node runs one kind of machine, or an
explicit precision.
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere: other systems keep fp32 on `auto`)."""
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


def resolve_precision(requested: str, accelerator: str, flags: set[str] | None = None) -> str:
    """The Lightning precision to train in; anything but `auto` is returned as asked."""
    if requested != "auto":
        return requested
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    if accelerator not in ("auto", "cpu"):
        return "32"
    native = flags if flags is not None else cpu_flags()
    return "bf16-mixed" if any(f in native for f in NATIVE_BF16_CPU_FLAGS) else "32"
