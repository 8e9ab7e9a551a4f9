"""FID's trace term Tr((S1 S2)^1/2): two symmetric eigendecompositions (ours) against scipy's
general `sqrtm` of the product (torch-fidelity's and pytorch-fid's way), on 2048-d covariances
of Gaussian features with N below and above the dimension, timed alternately in one process.
Below the dimension, also the route `frechet_distance` takes there: one SVD of the N x N
cross product of the features themselves.

    python bench/quality/fid_trace.py [--repeats 3] [--out metrics/bench.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import linalg

from results import store_entry
from sdvae.scoring.features import FEATURES, trace_sqrt_product, trace_sqrt_product_of_features

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    entry: dict = {
        "command": "python bench/quality/fid_trace.py",
        "features": FEATURES,
        "cpus": os.cpu_count(),
        "cases": {},
    }
    for images in (26, 1000, 5000):
        a = rng.standard_normal((images, FEATURES))
        b = 0.8 * a + 0.6 * rng.standard_normal((images, FEATURES))
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        ours_t, ref_t, feat_t = [], [], []
        low_rank = images < FEATURES
        for _ in range(args.repeats):
            if low_rank:
                t = time.perf_counter()
                by_features = trace_sqrt_product_of_features(a, b)
                feat_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours = trace_sqrt_product(s1, s2)
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = float(np.trace(np.real(linalg.sqrtm(s1 @ s2))))
            ref_t.append(time.perf_counter() - t)
        entry["cases"][f"n_{images}"] = {
            "eigh_s": statistics.median(ours_t),
            "sqrtm_s": statistics.median(ref_t),
            "ratio_speed_eigh_over_sqrtm": statistics.median(ref_t) / statistics.median(ours_t),
            "relative_difference": abs(ours - ref) / abs(ref),
        }
        if low_rank:
            entry["cases"][f"n_{images}"].update(
                {
                    "features_s": statistics.median(feat_t),
                    "ratio_speed_features_over_eigh": statistics.median(ours_t) / statistics.median(feat_t),
                    "features_relative_difference": abs(by_features - ref) / abs(ref),
                }
            )
        print(images, entry["cases"][f"n_{images}"], flush=True)
    store_entry(args.out, "fid_trace", entry)


if __name__ == "__main__":
    main()
