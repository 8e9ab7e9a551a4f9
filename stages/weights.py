"""Stage `weights`: resolve LPIPS-VGG16 and FID-InceptionV3 weights into data/weights (DVC-tracked).

Later stages read these files (see `stages/common.py`), so the pipeline depends on tracked
weights, not on whatever a user cache holds.
"""

from __future__ import annotations

import shutil

from safetensors.torch import save_file

from common import PIPELINE_INCEPTION, PIPELINE_VGG
from sdvae.config import load_config
from sdvae.io import atomic_path
from sdvae.pretrained import load_vgg16_features, resolve_inception, resolve_vgg16


def main() -> None:
    cfg = load_config()
    vgg = resolve_vgg16(cfg.weights.lpips_vgg, cfg.weights.cache_dir)
    with atomic_path(PIPELINE_VGG) as tmp:
        save_file(load_vgg16_features(vgg), str(tmp))  # one layout, whichever source won
    inception = resolve_inception(cfg.weights.inception, cfg.weights.cache_dir)
    with atomic_path(PIPELINE_INCEPTION) as tmp:
        shutil.copyfile(inception, tmp)
    print(f"LPIPS VGG16: {vgg} -> {PIPELINE_VGG}\nFID InceptionV3: {inception} -> {PIPELINE_INCEPTION}")


if __name__ == "__main__":
    main()
