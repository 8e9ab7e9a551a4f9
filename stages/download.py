"""Stage `download`: materialise the train and eval sources into data/raw/{train,eval}."""

from __future__ import annotations

import json

from sdvae.config import load_config
from sdvae.data.sources import download_split
from sdvae.io import atomic_dir
from sdvae.pretrained import default_cache_dir


def main() -> None:
    cfg = load_config()
    d = cfg.data
    cache = default_cache_dir(cfg.weights.cache_dir) / "downloads"
    with atomic_dir("data/raw") as tmp:
        train = download_split(
            d.train_source,
            tmp / "train",
            image_column=d.image_column,
            download_cache=cache,
            max_images=d.max_images,
            exclude_from=d.eval_source,
            eval_fraction=d.eval_fraction,
        )
        evals = download_split(
            d.eval_source,
            tmp / "eval",
            image_column=d.image_column,
            download_cache=cache,
            max_images=d.max_images,
            exclude_from=d.train_source,
            eval_fraction=d.eval_fraction,
            is_eval=True,
        )
    print(json.dumps({"train": train, "eval": evals}, indent=2))


if __name__ == "__main__":
    main()
