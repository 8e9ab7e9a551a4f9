"""Stage `prepare`: data/raw -> validated sharded caches data/cache/{train,eval}."""

from __future__ import annotations

from pathlib import Path

from sdvae.config import load_config
from sdvae.data.prepare import PrepareSpec, prepare_split
from sdvae.io import write_json


def main() -> None:
    cfg = load_config()
    d = cfg.data
    common = {"min_size": d.min_size, "max_pixels": d.max_image_pixels, "shard_size": d.shard_size, "seed": d.seed}
    train = prepare_split(
        Path("data/raw/train"),
        Path("data/cache/train"),
        PrepareSpec(
            mode="train",
            resolution=cfg.train.resolution,
            crops_per_image=d.crops_per_image,
            short_side=d.train_short_side,
            **common,
        ),
    )
    evals = prepare_split(
        Path("data/raw/eval"),
        Path("data/cache/eval"),
        PrepareSpec(mode="eval", resolution=cfg.eval.resolution, **common),
    )
    summary = {
        split: {"images": len(m["images"]), "cached": m["count"], "skipped": len(m["skipped"])}
        for split, m in (("train", train), ("eval", evals))
    }
    write_json("metrics/data.json", summary)
    print(summary)


if __name__ == "__main__":
    main()
