"""What `train.precision: auto` costs at the start of a run: timing fp32 and bf16 on this CPU.

On a CPU without native bf16 (AVX2 only) a bf16 step runs ~25x slower than fp32; timing it for
every round cost minutes of each run's start. `time_step_variants` now stops timing a precision
whose warm-up step is over `HOPELESS_FACTOR` x the fastest of its phase. This times the default's
measurement (params.yaml, fp32 and bf16, each phase of the run) with the cut (`current`) and
without it (`all_rounds`, the factor set out of reach), alternately, and writes the
`precision_timing` entry of metrics/bench.json. Where bf16 is native neither variant is cut and
the ratio is ~1.

    python bench/speed/precision_timing.py [--repeats 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import statistics
import time

import torch
import yaml

import sdvae.training.step_timing as step_timing
from results import store_entry
from sdvae.config import config_from_dict
from sdvae.metrics import build_lpips
from sdvae.models.factory import build_autoencoder
from sdvae.training.timing_cache import machine_identity

ROOT = Path(__file__).resolve().parents[2]


def timed_measure(cut: bool) -> tuple[float, dict[str, dict[str, float]]]:
    cfg = config_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    perceptual = build_lpips(cfg.weights)
    autoencoder = build_autoencoder(cfg.model, cfg.train.resolution)
    factor = step_timing.HOPELESS_FACTOR
    step_timing.HOPELESS_FACTOR = factor if cut else float("inf")
    try:
        start = time.perf_counter()
        steps = step_timing.measure(cfg, autoencoder, perceptual, ["32", "bf16-mixed"], torch.device("cpu"))
        return time.perf_counter() - start, steps
    finally:
        step_timing.HOPELESS_FACTOR = factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"current": [], "all_rounds": []}
    steps: dict[str, dict[str, dict[str, float]]] = {}
    for _ in range(args.repeats):
        for name, cut in (("current", True), ("all_rounds", False)):
            took, steps[name] = timed_measure(cut)
            seconds[name].append(round(took, 1))
    current, reference = statistics.median(seconds["current"]), statistics.median(seconds["all_rounds"])
    entry = {
        "what": "seconds `auto` spends timing fp32 and bf16 for the default params (every phase of the run)",
        "machine": machine_identity(),
        "seconds": seconds,
        "step_s": steps,
        "speedup_current_over_all_rounds": round(reference / current, 2),
        "command": "python bench/speed/precision_timing.py",
    }
    store_entry(args.out, "precision_timing", entry)
    print(entry)


if __name__ == "__main__":
    main()
