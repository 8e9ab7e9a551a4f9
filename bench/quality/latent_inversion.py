"""Whose error is it, the encoder's or the decoder's? Decode the encoder's latent, then the best
latent the decoder can be driven to, against bicubic.

Per image: the PSNR of decode(encode(x)) (the model as shipped), the PSNR of decode(z*) where
z* starts at the encoder's posterior mode and is fitted to the image by Adam on the pixel MSE
(the decoder's reach: what it can draw when it is handed the right latent), and bicubic at the
latent's value count. A large encoded-to-inverted gap with the inverted figure above bicubic
says the decoder can draw the image and the encoder misses its latent (an amortisation gap),
so the lever is the encoder or what it is trained on, not the decoder's capacity. `latent_shift`
is the mean |z* - z| over the std of z: how far the encoder's aim is off, in its own units.

Images are the originals `sdvae evaluate --save-images` writes, plus the flat fields of
bench/quality/flat_field.py at the same size. Writes `latent_inversion_<name>` in metrics/bench.json.

    sdvae evaluate MODEL bicubic --data builtin:unseen --resolution 128 --save-images /tmp/diag/unseen
    python bench/quality/latent_inversion.py /tmp/diag/unseen --model MODEL --name unseen
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flat_field import FIELDS, field
from per_image import photo_name
from results import store_entry
from sdvae.baseline import bicubic_roundtrip
from sdvae.formats import load_any
from sdvae.scoring.protocol import psnr_per_image, to_uint8

ROOT = Path(__file__).resolve().parents[2]


def load_originals(folder: Path) -> tuple[list[str], torch.Tensor]:
    """The saved originals as (N, 3, H, W) in [-1, 1], named by photo."""
    paths = sorted((folder / "originals").glob("*.png"))
    if not paths:
        raise SystemExit(f"no originals/*.png under {folder}: run `sdvae evaluate ... --save-images {folder}`")
    arrays = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1 for p in paths]
    return [photo_name(p) for p in paths], torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def psnr(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-image PSNR in `sdvae evaluate`'s protocol (both sides as 8-bit images)."""
    return [round(float(v), 2) for v in psnr_per_image(to_uint8(x), to_uint8(y))]


def invert(decode, z0: torch.Tensor, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """z fitted to x by Adam from z0; per-image losses are summed, so each latent moves on its own."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = (decode(z) - x).pow(2).mean(dim=(1, 2, 3)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return z.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a `sdvae evaluate --save-images` folder (originals/*.png)")
    parser.add_argument("--model", default=str(ROOT / "models/vae"))
    parser.add_argument("--name", default="unseen")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_any(Path(args.model)).eval().requires_grad_(False)
    names, photos = load_originals(Path(args.folder))
    size = photos.shape[-1]
    fields = torch.cat([field(colour, size) for colour in FIELDS.values()])
    rows = []
    for kind, labels, x in (("photo", names, photos), ("flat field", list(FIELDS), fields)):
        with torch.no_grad():
            z0 = model.encode(x).mode()
            encoded = model.decode(z0).clamp(-1, 1)
        z = invert(model.decode, z0, x, args.steps, args.lr)
        with torch.no_grad():
            inverted = model.decode(z).clamp(-1, 1)
        shift = ((z - z0).abs().mean(dim=(1, 2, 3)) / z0.std(dim=(1, 2, 3))).tolist()
        bicubic = bicubic_roundtrip(x, model.downsample_factor, model.config.latent_channels)
        columns = zip(
            labels, psnr(x, bicubic), psnr(x, encoded), psnr(x, inverted), shift,
            strict=True,
        )  # fmt: skip
        for label, b, e, i, s in columns:
            rows.append({"image": label, "kind": kind, "bicubic_psnr": b, "encoded_psnr": e, "inverted_psnr": i,
                         "latent_shift": round(s, 3)})  # fmt: skip

    def mean(kind: str, key: str) -> float:
        return round(float(np.mean([r[key] for r in rows if r["kind"] == kind])), 2)

    summary = {
        kind: {key: mean(kind, key) for key in ("bicubic_psnr", "encoded_psnr", "inverted_psnr", "latent_shift")}
        for kind in ("photo", "flat field")
    }
    entry = {
        "model": args.model, "images": args.folder, "size": size, "steps": args.steps, "lr": args.lr,
        "mean": summary, "rows": rows,
        "command": f"python bench/quality/latent_inversion.py {args.folder} --model {args.model} --name {args.name} "
        f"--steps {args.steps} --lr {args.lr}",
    }  # fmt: skip
    store_entry(args.out, f"latent_inversion_{args.name}", entry)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
