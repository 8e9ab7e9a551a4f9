"""Do the scores carry over to photos the project never trained or tuned on?

Scores trained models (diffusers folders, e.g. one per seed) and the bicubic baseline on the
`builtin:unseen` photos (12 photographic wallpapers from Debian's plasma-workspace-wallpapers
and lomiri-wallpapers-20.04: in no train or eval set of the project) with `sdvae evaluate`'s
protocol (per-image PSNR, both SSIMs, LPIPS, KID; rFID on 12 images would mean nothing), all
models on the same images in one pass. Writes the `out_of_set` entry of metrics/bench.json and
a grid of the reconstructions.

    python bench/quality/out_of_set.py --models models/vae[,seed1/vae,...] [--resolution 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
import statistics
from pathlib import Path

from results import store_entry
from sdvae.scoring.report import better_than, flat_metrics, save_grid
from sdvae.scoring.run import ScoreOptions, score_models

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("psnr", "ssim_gaussian", "ssim_uniform", "lpips")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "models/vae"), help="comma-separated model folders")
    parser.add_argument("--source", default="builtin:unseen")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--grid", default=str(ROOT / "metrics/out_of_set_grid.png"))
    args = parser.parse_args()
    folders = args.models.split(",")
    options = ScoreOptions(resolution=args.resolution, batch_size=12, workers=0, accelerator="cpu", grid_images=6)
    result = score_models([(f, f) for f in folders] + [("bicubic", "bicubic")], args.source, options)
    assert result is not None
    save_grid(result, Path(args.grid))
    per_model = {f: {k: round(v, 4) for k, v in flat_metrics(result["models"][f]).items()} for f in folders}
    baseline = {k: round(v, 4) for k, v in flat_metrics(result["models"]["bicubic"]).items()}
    mean = {k: round(statistics.fmean(m[k] for m in per_model.values()), 4) for k in METRICS}
    values = {k: [m[k] for m in per_model.values()] for k in METRICS}
    spread = {k: round(max(v) - min(v), 4) for k, v in values.items()}
    entry = {
        "what": f"{result['images']} photos in no set of the project ({args.source}), {args.resolution} px "
        "center crops, sdvae evaluate's per-image protocol",
        "models": per_model,
        "mean": mean,
        "spread": spread,
        "bicubic": baseline,
        "beats_bicubic": {k: v for k, v in better_than(mean, baseline).items() if k in METRICS},
        "command": f"python bench/quality/out_of_set.py --models {args.models} --resolution {args.resolution}",
    }
    store_entry(args.out, "out_of_set", entry)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
