"""Stage `train`: Lightning VAE-GAN training, resumable, tracked in MLflow."""

from __future__ import annotations

import json

from common import pipeline_config
from sdvae.config import load_config
from sdvae.training.run import train


def main() -> None:
    print(json.dumps(train(pipeline_config(load_config())), indent=2))


if __name__ == "__main__":
    main()
