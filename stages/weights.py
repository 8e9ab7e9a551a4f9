"""Stage `weights`: resolve LPIPS-VGG16 and FID-InceptionV3 weights into data/weights (tracked)."""

from __future__ import annotations

import shutil
from pathlib import Path

from sdvae.config import load_config
from sdvae.io import atomic_path
from sdvae.pretrained import resolve_inception, resolve_vgg16

OUT = Path("data/weights")


def main() -> None:
    cfg = load_config()
    for src, name in (
        (resolve_vgg16(cfg.weights.lpips_vgg, cfg.weights.cache_dir), "lpips_vgg16"),
        (resolve_inception(cfg.weights.inception, cfg.weights.cache_dir), "fid_inception"),
    ):
        target = OUT / f"{name}{src.suffix}"
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        print(f"{name}: {src} -> {target}")


if __name__ == "__main__":
    main()
