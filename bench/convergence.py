"""Convergence benchmark: how far each weight init gets in the same number of steps.

Trains the tiny autoencoder with L1 only (no LPIPS, no GAN, posterior mode) from the
`pytorch` and the `scaled_residual` init on the same batches, plus a linear 8x8 patch
autoencoder with the same latent size as a reference for "how fast an easy model learns",
and scores each on the eval cache (PSNR, L1) next to the bicubic baseline. The figure that
matters is the same-run difference between the two inits. Updates the `convergence` entry
of metrics/bench.json.

    python bench/convergence.py [--steps 300] [--lr 5e-4]   # needs `dvc repro prepare` first
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sdvae.baseline import bicubic_roundtrip
from sdvae.config import ModelConfig
from sdvae.data.datamodule import EvalImages, TrainImages, read_manifest, to_model_range
from sdvae.evaluation import ReconstructionMetrics
from sdvae.io import write_json
from sdvae.models.factory import build_autoencoder

ROOT = Path(__file__).resolve().parents[1]


class LinearPatchAE(nn.Module):
    """Stride-8 conv to 4 channels and back: the simplest f8c4 autoencoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Conv2d(3, 4, 8, 8), nn.ConvTranspose2d(4, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def reconstruct_fn(model: nn.Module):  # type: ignore[no-untyped-def]
    if isinstance(model, LinearPatchAE):
        return model
    return lambda x: model.decode(model.encode(x).mode())


def fit(model: nn.Module, train: Path, steps: int, lr: float, batch: int, seed: int) -> float:
    """L1 training with the pipeline's optimizer settings; returns seconds. The same seed gives
    the same batches and the same fresh crops (64 px, short side 64-192 as in params.yaml)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = TrainImages(train, 64, (64, 192), shuffle=False)
    subset = Subset(images, range(read_manifest(train)["count"]))
    loader = DataLoader(subset, batch_size=batch, shuffle=True, drop_last=True, generator=gen)
    rec = reconstruct_fn(model)
    done, start = 0, time.perf_counter()
    while done < steps:
        for b in loader:
            x = to_model_range(b)
            loss = (rec(x) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            if done >= steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def score(fn, eval_dir: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    metrics = ReconstructionMetrics(None)
    images = EvalImages(eval_dir)
    for b in DataLoader(Subset(images, range(images.manifest["count"])), batch_size=8):
        x = to_model_range(b)
        metrics.update(x, fn(x).clamp(-1, 1))
    return {k: round(v, 4) for k, v in metrics.compute().items() if v is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", default=str(ROOT / "data/cache/train"))
    parser.add_argument("--eval", default=str(ROOT / "data/cache/eval"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    train, eval_dir = Path(args.train), Path(args.eval)
    rows: dict[str, dict[str, float]] = {}
    for init in ("pytorch", "scaled_residual"):
        torch.manual_seed(0)
        model = build_autoencoder(ModelConfig(preset="tiny", init=init), 64)
        seconds = fit(model, train, args.steps, args.lr, args.batch, seed=0)
        rows[f"tiny_{init}"] = {**score(reconstruct_fn(model.eval()), eval_dir), "train_s": round(seconds, 1)}
        print(init, rows[f"tiny_{init}"], flush=True)
    torch.manual_seed(0)
    linear = LinearPatchAE()
    seconds = fit(linear, train, args.steps, 1e-3, args.batch, seed=0)
    rows["linear_patch_ae"] = {**score(linear.eval(), eval_dir), "train_s": round(seconds, 1)}
    rows["bicubic_baseline"] = score(lambda x: bicubic_roundtrip(x, 8, 4), eval_dir)
    result = {
        "what": "eval-set PSNR/L1 after the same L1-only training steps and batches; eval at cache resolution",
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "rows": rows,
        "psnr_gain_scaled_residual_db": round(rows["tiny_scaled_residual"]["psnr"] - rows["tiny_pytorch"]["psnr"], 3),
        "command": f"python bench/convergence.py --steps {args.steps} --lr {args.lr}",
    }
    out = Path(args.out)
    bench = json.loads(out.read_text()) if out.is_file() else {}
    bench["convergence"] = result
    write_json(out, bench)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
