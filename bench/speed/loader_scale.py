"""Training-loader rate with crops decoded at their drawn scale, against the legacy loader
(decode at the range's bottom, then upsample), one process, measured interleaved in one run.

Three stored sets: the embedded default's (`data/cache/train`: the built-in photos at short side
192, 64 px crops from [64, 192]; run `dvc repro prepare` first), and for the GPU preset's 256 px
crops from [256, 512]: 500x375 JPEGs (ImageNet's typical size, kept as they are) and 768x512
JPEGs (larger photos stored at short side 512, where the legacy loader decoded at half size).
Writes the `loader` entry of metrics/bench.json.

    python bench/speed/loader_scale.py [--samples 400] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sdvae.data.datamodule as dm
from legacy_loader import legacy_crop
from photo_sets import jpeg_crops
from results import store_entry
from sdvae.data.prepare import PrepareSpec, prepare_split

ROOT = Path(__file__).resolve().parents[2]
GPU_IMAGES_PER_S = 55.0  # the SD f8c4 trainer at 256 px, bf16, one H100 (DESIGN.md); plan for 3x


def rate(images: dm.TrainImages, samples: int) -> float:
    count = len(images)
    start = time.perf_counter()
    for i in range(samples):
        images[i % count]
    return samples / (time.perf_counter() - start)


def measure(cache: Path, resolution: int, short_side: tuple[int, int], samples: int, rounds: int) -> dict:
    """Median images/s of each loader over `rounds` interleaved rounds."""
    images = dm.TrainImages(cache, resolution, short_side, shuffle=False)
    current_crop = dm.random_crop_encoded
    rates: dict[str, list[float]] = {"current": [], "legacy": []}
    for _ in range(rounds):
        for name, crop in (("legacy", legacy_crop), ("current", current_crop)):
            dm.random_crop_encoded = crop
            torch.manual_seed(0)
            rates[name].append(rate(images, samples))
    dm.random_crop_encoded = current_crop
    row = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    row["current_over_legacy"] = round(row["current"] / row["legacy"], 3)
    row["current_over_3x_gpu_need"] = round(row["current"] / (3 * GPU_IMAGES_PER_S), 2)
    return {"resolution": resolution, "short_side": list(short_side), "images_per_s": row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", default=str(ROOT / "data/raw/train/images"))
    parser.add_argument("--default-cache", default=str(ROOT / "data/cache/train"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker decodes on one thread
    result: dict = {"what": "training crops per second of one loader process (decode + scale + crop + flip)"}
    result["embedded_default_64px"] = measure(Path(args.default_cache), 64, (64, 192), args.samples, args.rounds)
    print(json.dumps(result["embedded_default_64px"]), flush=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        for label, size in (("gpu_preset_256px_500x375", (500, 375)), ("gpu_preset_256px_768x512", (768, 512))):
            raw, cache = Path(tmp) / label, Path(tmp) / f"{label}-cache"
            jpeg_crops(Path(args.photos), raw / "images", size, 200)
            prepare_split(raw, cache, PrepareSpec("train", 256, 64, 10**9, max_short_side=512))
            result[label] = measure(cache, 256, (256, 512), args.samples, args.rounds)
            print(label, json.dumps(result[label]), flush=True)
    result["gpu_need_images_per_s"] = GPU_IMAGES_PER_S
    result["command"] = f"python bench/speed/loader_scale.py --samples {args.samples} --rounds {args.rounds}"
    store_entry(args.out, "loader", result)


if __name__ == "__main__":
    main()
