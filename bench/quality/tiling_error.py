"""Tiled vs untiled reconstruction error of a trained model on the eval photos.

python bench/quality/tiling_error.py [--model models/vae] [--raw data/raw/eval] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sdvae.data.datamodule import EvalImages, to_model_range
from sdvae.data.prepare import PrepareSpec, prepare_split
from sdvae.formats import load_any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/vae")
    parser.add_argument("--raw", default="data/raw/eval")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 192])
    args = parser.parse_args()
    model = load_any(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare_split(Path(args.raw), Path(tmp) / "c", PrepareSpec("eval", args.resolution, 16, 10**9))
        ds = EvalImages(Path(tmp) / "c")
        x = to_model_range(torch.stack([ds[i] for i in range(manifest["count"])]))
    result = {"images": manifest["count"], "resolution": args.resolution, "scale": "[-1, 1]"}
    with torch.no_grad():
        full = model.reconstruct(x).clamp(-1, 1)
        for tile in args.tiles:
            model.tile_size = tile
            err = (model.reconstruct(x).clamp(-1, 1) - full).abs()
            result[f"tile_{tile}"] = {"max_abs": float(err.max()), "mean_abs": float(err.mean())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
