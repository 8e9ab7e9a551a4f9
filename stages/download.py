"""Stage `download`: materialise the train and eval sources into data/raw/{train,eval}."""

from __future__ import annotations

import json

from sdvae.config import ConfigError, load_config
from sdvae.data.sources import SourceError, check_available, download_split
from sdvae.io import atomic_dir
from sdvae.pretrained import default_cache_dir


def main() -> None:
    cfg = load_config()
    d = cfg.data
    cache = default_cache_dir(cfg.weights.cache_dir) / "downloads"
    splits = {"train": (d.train_source, d.eval_source), "eval": (d.eval_source, d.train_source)}
    info = {}
    with atomic_dir("data/raw") as tmp:
        for split, (source, other) in splits.items():
            try:
                check_available(source)
                info[split] = download_split(
                    source,
                    tmp / split,
                    image_column=d.image_column,
                    download_cache=cache,
                    max_images=d.max_images,
                    exclude_from=other,
                    eval_fraction=d.eval_fraction,
                    is_eval=split == "eval",
                )
            except SourceError as exc:
                raise ConfigError(f"data.{split}_source: {exc}") from exc
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
