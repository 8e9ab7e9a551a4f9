"""Per-image diagnosis of a model against bicubic: which photos lose, and whether smoothness says why.

Reads the folders `sdvae evaluate ... --save-images DIR` writes (originals/, one folder per
model), computes each image's PSNR on [0, 1] for every model, the mean absolute pixel gradient
of the original (how smooth it is), and how much of the model's squared error is a shift of the
whole image's mean colour (the per-channel mean difference: the lowest-frequency error there is,
which LPIPS barely sees), with the PSNR it would have without that shift. Writes a sorted table
into metrics/bench.json and a grid of the worst photos (original / model / bicubic rows).

    sdvae evaluate models/vae bicubic --data builtin:unseen --resolution 128 --save-images /tmp/diag/unseen
    python bench/quality/per_image.py /tmp/diag/unseen --name unseen --grid metrics/per_image_unseen.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from results import store_entry
from sdvae.imagefiles import save_rows

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float64) / 255.0


def photo_name(original: Path) -> str:
    """The photo's own name from a saved original's file name (`<index>_<set>__<photo>.png`)."""
    return original.stem.split("_", 1)[1].split("__")[-1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def smoothness(img: np.ndarray) -> float:
    """Mean absolute horizontal and vertical difference of neighbouring pixels (0 = flat)."""
    return float((np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean()) / 2)


def rows_for(folder: Path, model: str, baseline: str) -> list[dict]:
    rows = []
    for original in sorted((folder / "originals").glob("*.png")):
        x = _load(original)
        m, b = _load(folder / model / original.name), _load(folder / baseline / original.name)
        mse = float(np.mean((m - x) ** 2))
        dc = float(np.mean((m - x).mean(axis=(0, 1)) ** 2))  # squared error of the mean colour alone
        rows.append(
            {
                "image": photo_name(original),
                "gradient": round(smoothness(x), 4),
                "bicubic_psnr": round(psnr(b, x), 2),
                "model_psnr": round(psnr(m, x), 2),
                "model_minus_bicubic": round(psnr(m, x) - psnr(b, x), 2),
                "colour_shift_share_of_mse": round(dc / mse, 3) if mse > 0 else 0.0,
                "model_psnr_without_colour_shift": round(10 * math.log10(1.0 / max(mse - dc, 1e-12)), 2),
            }
        )
    return sorted(rows, key=lambda r: r["gradient"])


def worst_grid(folder: Path, model: str, baseline: str, rows: list[dict], out: Path, n: int = 4) -> None:
    worst = sorted(rows, key=lambda r: r["model_minus_bicubic"])[:n]
    names = {p.stem.split("_", 1)[1].split("__")[-1]: p.name for p in (folder / "originals").glob("*.png")}

    def row(sub: str) -> torch.Tensor:
        imgs = [_load(folder / sub / names[r["image"]]) for r in worst]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() * 2 - 1

    caption = " | ".join(f"{r['image'][:18]} {r['model_minus_bicubic']:+.1f} dB" for r in worst)
    save_rows([row("originals"), row(model), row(baseline)], out, ["original", "model", "bicubic"], caption)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="what `sdvae evaluate --save-images` wrote")
    parser.add_argument("--name", required=True, help="the set's name, for the bench.json key")
    parser.add_argument("--model", default="models_vae", help="the model's folder under FOLDER")
    parser.add_argument("--baseline", default="bicubic")
    parser.add_argument("--grid", type=Path, help="PNG of the worst photos")
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    rows = rows_for(args.folder, args.model, args.baseline)
    losing = [r for r in rows if r["model_minus_bicubic"] < 0]
    half = len(rows) // 2
    gain = [r["model_minus_bicubic"] for r in rows]
    entry = {
        "command": f"python bench/quality/per_image.py {args.folder} --name {args.name}",
        "images": len(rows),
        "losing_to_bicubic": len(losing),
        "mean_model_minus_bicubic_smoother_half": round(float(np.mean(gain[:half])), 2),
        "mean_model_minus_bicubic_textured_half": round(float(np.mean(gain[half:])), 2),
        "rows": rows,
    }
    store_entry(args.out, f"per_image_{args.name}", entry)
    head = ("photo", "gradient", "bicubic PSNR", "model PSNR", "model - bicubic", "mean-colour share", "model w/o it")
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['image'][:28]} | {r['gradient']:.3f} | {r['bicubic_psnr']:.2f} | {r['model_psnr']:.2f} | "
            f"{r['model_minus_bicubic']:+.2f} | {r['colour_shift_share_of_mse']:.2f} | "
            f"{r['model_psnr_without_colour_shift']:.2f} |"
        )
    print({k: v for k, v in entry.items() if k != "rows"})
    if args.grid:
        worst_grid(args.folder, args.model, args.baseline, rows, args.grid)


if __name__ == "__main__":
    main()
