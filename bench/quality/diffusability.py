"""Does the equivariance term make latents easier to diffuse, and what does it cost in reconstruction?

Fine-tunes the committed default model (models/vae, the export) for `--steps` windows with and
without `loss.equivariance`, `--seeds` seeds each, through the real trainer on the pipeline's train
cache (params.yaml otherwise; a full fine-tune, since the encoder must move; GAN off: a fresh
discriminator joining a short fine-tune would measure the GAN, not the term). Then scores the
starting model, every fine-tune (its EMA weights, as export ships) and bicubic with `sdvae
evaluate`'s protocol on the eval set and on `builtin:unseen` at 128 px, in one pass per set:
reconstruction (per-image PSNR, SSIM, LPIPS) beside diffusability (scale and rotation
equivariance, latent high-frequency share, iFID). Writes the `diffusability` entry of
metrics/bench.json; each fine-tune's folder is kept under --work, so a rerun only scores.

    python bench/quality/diffusability.py --seeds 0,1,2 --steps 300 --equivariance 0.5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from results import store_entry
from sdvae.config import config_from_dict
from sdvae.scoring.report import flat_metrics
from sdvae.scoring.run import ScoreOptions, score_models
from sdvae.training.run import TrainPaths, train

ROOT = Path(__file__).resolve().parents[2]
SHOWN = (
    "psnr",
    "ssim_gaussian",
    "lpips",
    "latent_scale_psnr",
    "latent_scale_lpips",
    "latent_rotation_psnr",
    "latent_hf_share",
    "rgb_hf_share",
    "ifid",
)
SOURCES = {"eval": str(ROOT / "data/cache/eval"), "unseen": "builtin:unseen"}


def finetune(base: dict[str, Any], args: argparse.Namespace, seed: int, equivariance: float) -> tuple[Path, float]:
    """The EMA folder of one fine-tune (trained unless already there) and its training seconds."""
    work = Path(args.work) / f"eq{equivariance}_seed{seed}_steps{args.steps}"
    out = work / "out" / "vae_ema"
    record = work / "seconds.json"
    if out.is_dir() and record.is_file():
        return out, json.loads(record.read_text())["seconds"]
    params = copy.deepcopy(base)
    params["train"].update(
        init_from=args.init,
        max_steps=args.steps,
        seed=seed,
        lr=args.lr,
        warmup_steps=args.warmup,
        val_every=args.steps,
        checkpoint_every=args.steps,
        log_every=50,
    )
    params["loss"].update(equivariance=equivariance, disc_factor=0.0)
    store = Path(args.work).resolve() / "mlflow.db"
    params["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "bench-diffusability"}
    paths = TrainPaths.under(work, ROOT / "data/cache")
    start = time.perf_counter()
    train(config_from_dict(params), paths)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def summarise(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in SHOWN:
        got = [v[key] for v in values if key in v]
        if got:
            out[key] = {"mean": round(statistics.fmean(got), 4), "spread": round(max(got) - min(got), 4)}
    return out


def markdown(entry: dict[str, Any]) -> str:
    head = "| set | model | " + " | ".join(SHOWN) + " |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 2)]
    for source, rows in entry["sets"].items():
        for label, row in rows.items():
            cells = []
            for key in SHOWN:
                cell = row.get(key)
                if isinstance(cell, dict):
                    cells.append(f"{cell['mean']:.3f} ± {cell['spread'] / 2:.3f}")
                else:
                    cells.append("n/a" if cell is None else f"{cell:.3f}")
            lines.append(f"| {source} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning windows per run")
    parser.add_argument("--equivariance", type=float, default=0.5, help="loss.equivariance of the runs with it")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--init", default=str(ROOT / "models/vae"))
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--work", default=str(ROOT / "outputs/bench_diffusability"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.params).read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[tuple[str, Path, float]]] = {"without": [], "with": []}
    for seed in seeds:
        for name, eq in (("without", 0.0), ("with", args.equivariance)):
            folder, seconds = finetune(base, args, seed, eq)
            runs[name].append((f"{name}-seed{seed}", folder, seconds))
    models = [("start", args.init)] + [(label, str(f)) for group in runs.values() for label, f, _ in group]
    options = ScoreOptions(resolution=args.resolution, batch_size=8, workers=0, progress=False, grid_images=0)
    entry: dict[str, Any] = {"sets": {}, "per_model": {}}
    for source_name, source in SOURCES.items():
        result = score_models([*models, ("bicubic", "bicubic")], source, options)
        assert result is not None
        flat = {label: flat_metrics(m) for label, m in result["models"].items()}
        entry["per_model"][source_name] = {k: {m: round(v, 4) for m, v in f.items()} for k, f in flat.items()}
        entry["sets"][source_name] = {
            "start": {k: flat["start"].get(k) for k in SHOWN},
            **{name: summarise([flat[label] for label, _, _ in group]) for name, group in runs.items()},
            "bicubic": {k: flat["bicubic"].get(k) for k in SHOWN},
        }
        entry.setdefault("images", {})[source_name] = result["images"]
    entry.update(
        what=f"fine-tunes of {args.init} for {args.steps} windows (lr {args.lr}, GAN off), "
        f"loss.equivariance {args.equivariance} against 0, seeds {seeds}; mean ± half the spread over seeds; "
        f"scored at {args.resolution} px",
        train_seconds={name: [round(s, 1) for _, _, s in group] for name, group in runs.items()},
        command=f"python bench/quality/diffusability.py --seeds {args.seeds} --steps {args.steps} "
        f"--equivariance {args.equivariance}",
    )
    store_entry(args.out, "diffusability", entry)
    print(markdown(entry))


if __name__ == "__main__":
    main()
