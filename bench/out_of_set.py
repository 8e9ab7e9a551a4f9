"""Do the scores carry over to photos the project never trained or tuned on?

Scores trained models (diffusers folders, e.g. one per seed) and the bicubic baseline on the
`builtin:unseen` photos (12 photographic wallpapers from Debian's plasma-workspace-wallpapers
and lomiri-wallpapers-20.04: in no train or eval set of the project), with the eval stage's
preprocessing (short side to the eval resolution, center crop) and metrics (LPIPS, PSNR, SSIM;
rFID on 12 images would mean nothing). Writes the `out_of_set` entry of metrics/bench.json and
a grid of the first model's reconstructions.

    python bench/out_of_set.py --models models/vae [--models-more seed1/vae,seed2/vae] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from sdvae.config import WeightsConfig
from sdvae.data.datamodule import to_model_range
from sdvae.data.encoding import decode, eval_bytes
from sdvae.data.sources import iter_source
from sdvae.evaluation import beats_baseline, evaluate_with_baseline
from sdvae.formats import load_any
from sdvae.imagefiles import save_rows
from sdvae.io import write_json
from sdvae.metrics import build_lpips
from sdvae.pretrained import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("lpips", "psnr", "ssim")


def unseen_batch(source: str, resolution: int, cache: Path) -> tuple[torch.Tensor, list[str]]:
    """Every photo of `source` as one [-1, 1] batch at the eval view."""
    names, crops = [], []
    for name, data in iter_source(source, "image", cache, cache / "licenses"):
        png, *_ = eval_bytes(data, 64, 200_000_000, resolution)
        crops.append(decode(png))
        names.append(name)
    x = to_model_range(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
    return x, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "models/vae"), help="comma-separated model folders")
    parser.add_argument("--source", default="builtin:unseen")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--grid", default=str(ROOT / "metrics/out_of_set_grid.png"))
    args = parser.parse_args()
    cache = default_cache_dir(None) / "downloads"
    x, names = unseen_batch(args.source, args.resolution, cache)
    lpips_net = build_lpips(WeightsConfig())
    per_model: dict[str, dict[str, float]] = {}
    baseline: dict[str, float] = {}
    for i, folder in enumerate(args.models.split(",")):
        model = load_any(folder)
        batches = list(x.split(8))
        scores, rows = evaluate_with_baseline(model, batches, lpips_net, lambda: None, "cpu", 8)  # type: ignore[arg-type,return-value]
        per_model[folder] = {k: round(float(scores["model"][k]), 4) for k in METRICS}
        baseline = {k: round(float(scores["baseline"][k]), 4) for k in METRICS}
        if i == 0:
            caption = f"{len(names)} unseen photos at {args.resolution} px | " + " | ".join(
                f"{k.upper()} model {per_model[folder][k]:.3f} / bicubic {baseline[k]:.3f}" for k in METRICS
            )
            save_rows(rows, Path(args.grid), labels=["input", "model", "bicubic"], caption=caption)
    mean = {k: round(statistics.fmean(m[k] for m in per_model.values()), 4) for k in METRICS}
    spread = {
        k: round(max(m[k] for m in per_model.values()) - min(m[k] for m in per_model.values()), 4) for k in METRICS
    }
    result = {
        "what": f"{len(names)} photos in no set of the project ({args.source}), {args.resolution} px center crops",
        "photos": names,
        "models": per_model,
        "mean": mean,
        "spread": spread,
        "bicubic": baseline,
        "beats_bicubic": {k: v for k, v in beats_baseline(mean, baseline).items() if k in METRICS},
        "command": f"python bench/out_of_set.py --models {args.models} --resolution {args.resolution}",
    }
    out = Path(args.out)
    bench = json.loads(out.read_text()) if out.is_file() else {}
    bench["out_of_set"] = result
    write_json(out, bench)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
