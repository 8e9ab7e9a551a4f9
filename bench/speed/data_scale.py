"""The data path at ImageNet scale: prepare time with 1 and N workers, cache bytes against the
source's, and the training loader's rate at 256 px; then what that means for ImageNet-100/1k.

The set: `--images` JPEGs of 500x375 at quality 90 (ImageNet's typical size), random crops
of the built-in photos (`data/raw/train`, run `dvc repro download` first). Writes the
`data_scale` entry of metrics/bench.json.

    python bench/speed/data_scale.py [--images 20000] [--workers 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from results import store_entry
from sdvae.data.datamodule import TrainImages
from sdvae.data.images import load_rgb
from sdvae.data.prepare import PrepareSpec, prepare_split

ROOT = Path(__file__).resolve().parents[2]
GPU_STEP_IMAGES_PER_S = 55.0  # the SD f8c4 step at 256 px on one H100 (docs/benchmarks.md); plan for 2-3x


def make_set(photos: Path, out: Path, count: int, seed: int = 0) -> int:
    """`count` 500x375 JPEG crops (quality 90) of the photos in `photos`; returns their total bytes."""
    rng = np.random.default_rng(seed)
    sources = [load_rgb(p, 16, 10**9) for p in sorted(photos.iterdir()) if p.is_file()]
    sources = [s for s in sources if s.shape[0] >= 375 and s.shape[1] >= 500]
    images = out / "images"
    images.mkdir(parents=True)
    for i in range(count):
        src = sources[i % len(sources)]
        top = int(rng.integers(0, src.shape[0] - 375 + 1))
        left = int(rng.integers(0, src.shape[1] - 500 + 1))
        crop = src[top : top + 375, left : left + 500]
        Image.fromarray(crop[:, ::-1] if i % 2 else crop).save(images / f"{i:06d}.jpg", quality=90)
    return sum(p.stat().st_size for p in images.iterdir())


def loader_rate(cache: Path, resolution: int, short_side: tuple[int, int], samples: int) -> float:
    """Samples/s of one loader process: decode + fresh random crop + flip."""
    images = TrainImages(cache, resolution, short_side, shuffle=False)
    subset = Subset(images, range(samples))
    start = time.perf_counter()
    for i in range(len(subset)):
        subset[i]
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photos", default=str(ROOT / "data/raw/train/images"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # loader workers decode on one thread each
    result: dict = {"images": args.images, "source": "500x375 JPEG, quality 90", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        raw = Path(tmp) / "raw"
        source_bytes = make_set(Path(args.photos), raw, args.images)
        result["source_bytes_per_image"] = source_bytes / args.images
        for max_short, label in ((256, "short256"), (512, "short512")):
            row: dict = {"max_short_side": max_short}
            for workers in sorted({1, args.workers}):
                cache = Path(tmp) / f"cache-{label}-{workers}"
                spec = PrepareSpec("train", 256, 64, 10**9, max_short_side=max_short, num_workers=workers)
                start = time.perf_counter()
                manifest = prepare_split(raw, cache, spec)
                seconds = time.perf_counter() - start
                row[f"prepare_s_{workers}_workers"] = seconds
                row[f"prepare_images_per_s_{workers}_workers"] = args.images / seconds
                row["cache_bytes_per_image"] = manifest["bytes"] / manifest["count"]
                row["cache_over_source_bytes"] = manifest["bytes"] / source_bytes
                row["chunks"] = manifest["chunks"]
                if workers == args.workers and args.workers > 1:
                    row["parallel_speedup"] = row["prepare_s_1_workers"] / seconds
                if workers == 1:
                    row["loader_images_per_s_per_worker"] = loader_rate(cache, 256, (256, max_short), 2000)
                shutil.rmtree(cache)
            rate = row["loader_images_per_s_per_worker"]
            row["loader_workers_for_55_img_s"] = GPU_STEP_IMAGES_PER_S / rate
            row["loader_workers_for_165_img_s"] = 3 * GPU_STEP_IMAGES_PER_S / rate
            per_core = row["prepare_images_per_s_1_workers"]
            for name, n in (("imagenet100", 126_689), ("imagenet1k", 1_281_167)):
                row[f"{name}_prepare_hours_16_cores_linear"] = n / (16 * per_core) / 3600
                row[f"{name}_cache_gb"] = n * row["cache_bytes_per_image"] / 1e9
            result[label] = row
            print(label, json.dumps(row, indent=2), flush=True)
    result["command"] = f"python bench/speed/data_scale.py --images {args.images} --workers {args.workers}"
    store_entry(args.out, "data_scale", result)


if __name__ == "__main__":
    main()
