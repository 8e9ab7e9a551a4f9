"""Stage `prepare`: data/raw -> validated sharded caches data/cache/{train,eval}."""

from __future__ import annotations

from pathlib import Path

from sdvae.config import load_config
from sdvae.data.prepare import PrepareSpec, prepare_split
from sdvae.io import write_json


def main() -> None:
    cfg = load_config()
    d = cfg.data
    common = {
        "min_size": d.min_size,
        "max_pixels": d.max_image_pixels,
        "chunk_mb": d.chunk_mb,
        "num_workers": max(1, d.num_workers),
    }
    # With data.cache_uri the train chunks go to object storage and data/cache/train holds the
    # manifest that points at them; the eval cache is small and read by index, so it stays here.
    remote = f"{d.cache_uri.rstrip('/')}/train" if d.cache_uri else None
    train = prepare_split(
        Path("data/raw/train"),
        Path("data/cache/train"),
        PrepareSpec(
            mode="train",
            resolution=cfg.train.resolution,
            max_short_side=d.max_short_side or d.train_short_side[1],
            jpeg_quality=d.jpeg_quality,
            samples_per_image=d.samples_per_image,
            **common,
        ),
        remote=remote,
    )
    evals = prepare_split(
        Path("data/raw/eval"),
        Path("data/cache/eval"),
        PrepareSpec(mode="eval", resolution=cfg.eval.resolution, **common),
    )
    summary = {
        split: {
            "images": len(m["images"]),
            "cached": m["count"],
            "cache_bytes": m["bytes"],
            "skipped": len(m["skipped"]),
            "skipped_files": m["skipped"],
        }
        for split, m in (("train", train), ("eval", evals))
    }
    write_json("metrics/data.json", summary)
    print(summary)


if __name__ == "__main__":
    main()
