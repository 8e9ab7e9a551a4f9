"""How a model reproduces flat content: a uniform colour with a gentle vertical ramp, at several sizes.

Smooth photos are where the default loses to bicubic (docs/quality.md, per-image table). This isolates that
content: each field is one colour plus a ramp of +-0.05 on [0, 1] from top to bottom (a sky, a
grey wall), encoded to the posterior mode and decoded in fp32. Per field and size it records the
PSNR, the error of the mean colour per channel (on [0, 1]), and the PSNR in the 8-pixel border
frame against the interior (border bands show as a lower border PSNR). Bicubic at the latent's
value count is the reference; it reproduces a ramp almost exactly. Writes the `flat_field` entry
of metrics/bench.json and a grid (per field: input, model, bicubic) at the largest size.

    python bench/quality/flat_field.py [--model models/vae] [--sizes 64,128,256]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
import math
from pathlib import Path

import torch

from results import store_entry
from sdvae.baseline import bicubic_roundtrip
from sdvae.formats import load_any
from sdvae.imagefiles import save_rows

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"sky": (0.3, 0.5, 0.9), "grey": (0.5, 0.5, 0.5), "night": (0.1, 0.1, 0.15), "sand": (0.85, 0.75, 0.55)}
BORDER = 8


def field(colour: tuple[float, float, float], size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]."""
    ramp = torch.linspace(-0.05, 0.05, size).view(1, 1, size, 1)
    x = torch.tensor(colour).view(1, 3, 1, 1) + ramp
    return x.expand(1, 3, size, size).clamp(0, 1) * 2 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) / 2).pow(2).mean())
    return math.inf if mse == 0 else round(10 * math.log10(1 / mse), 2)


def scores(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    inner = (slice(None), slice(None), slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    frame = torch.ones_like(x, dtype=torch.bool)
    frame[inner] = False
    return {
        "psnr": psnr(x, y),
        "interior_psnr": psnr(x[inner], y[inner]),
        "border_psnr": psnr(x[frame], y[frame]),
        "mean_colour_error": [round(float(v) / 2, 4) for v in (y - x).mean(dim=(0, 2, 3))],
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/vae"))
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--grid", default=str(ROOT / "metrics/flat_field.png"))
    args = parser.parse_args()
    model = load_any(Path(args.model)).eval()
    f, c = model.downsample_factor, model.config.latent_channels
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: dict[str, dict[str, object]] = {}
    grid: list[list[torch.Tensor]] = [[], [], []]
    for name, colour in FIELDS.items():
        for size in sizes:
            x = field(colour, size)
            y = model.decode(model.encode(x).mode()).clamp(-1, 1)
            b = bicubic_roundtrip(x, f, c)
            rows[f"{name}@{size}"] = {"model": scores(x, y), "bicubic": scores(x, b)}
            if size == sizes[-1]:
                for row, img in zip(grid, (x, y, b), strict=True):
                    row.append(img)
    save_rows([torch.cat(r) for r in grid], Path(args.grid), labels=["input", "model", "bicubic"], caption=(
        f"flat fields with a +-0.05 ramp at {sizes[-1]} px: {', '.join(FIELDS)}"
    ))  # fmt: skip
    entry = {"model": args.model, "fields": rows, "command": f"python bench/quality/flat_field.py --model {args.model}"}
    store_entry(args.out, "flat_field", entry)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
