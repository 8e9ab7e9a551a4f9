"""Convergence benchmark: eval-set quality against training wall-clock, recipe against recipe.

Each recipe is params.yaml plus a few overrides. Every run drives the real training module
(`VAEGANModule`, Lightning Trainer, litdata loader, fresh crops) and, every `--eval-every`
windows, scores the weights that export would ship (EMA) on the whole eval cache with the
evaluate stage's metrics (LPIPS, PSNR, SSIM; no rFID), next to the bicubic baseline. Evaluation
time is left out of the clock. Runs are cached in a JSON-lines file keyed by recipe, overrides,
seed and steps, so the bench can be extended or resumed; the summary (mean and spread over seeds)
goes to the `convergence` entry of metrics/bench.json and the curves to metrics/convergence.png.

    python bench/quality/convergence.py --recipes default,logvar_-6 --seeds 0 --steps 400   # after `dvc repro prepare`
    python bench/quality/convergence.py --list
    python bench/quality/convergence.py --recipes auto_precision --seeds 0,1,2 --loader legacy  # the old loader

`--loader legacy` measures the loader as it was before crops were decoded at their drawn scale
(each JPEG decoded at the DCT scale of the range's bottom, then resized up to the draw), so the
two can be compared on the same machine; runs are cached per loader.
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
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from legacy_loader import use_legacy_loader
from results import store_entry
from sdvae.baseline import bicubic_roundtrip
from sdvae.config import Config, ConfigError, config_from_dict
from sdvae.data.datamodule import ImageDataModule, eval_batches
from sdvae.evaluation import ReconstructionMetrics
from sdvae.formats.diffusers import save_diffusers
from sdvae.metrics import build_lpips
from sdvae.models.factory import build_autoencoder
from sdvae.training.measured import measure_setup
from sdvae.training.module import VAEGANModule

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("lpips", "psnr", "ssim")

# Overrides on params.yaml (dotted keys). Each one asks one question of the list.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "logvar_-6": {"model.init_logvar": -6.0},
    "logvar_-6_no_gan": {"model.init_logvar": -6.0, "loss.disc_factor": 0.0},
    "logvar_-6_lpips_0.25": {"model.init_logvar": -6.0, "loss.perceptual_weight": 0.25},
    "logvar_-6_lr_1e-3": {"model.init_logvar": -6.0, "train.lr": 1.0e-3},
    "logvar_-6_l2": {"model.init_logvar": -6.0, "loss.reconstruction": "l2"},
    "logvar_-6_ema_0.999": {"model.init_logvar": -6.0, "train.ema_decay": 0.999},
    "logvar_-6_betas_0.9": {"model.init_logvar": -6.0, "train.betas": [0.9, 0.99]},
    "logvar_-6_batch_16": {"model.init_logvar": -6.0, "train.batch_size": 16},
    "logvar_-6_narrow": {
        "model.init_logvar": -6.0,
        "model.block_out_channels": [16, 32, 64, 64],
        "model.norm_num_groups": 8,
    },
    "logvar_-6_wide": {"model.init_logvar": -6.0, "model.block_out_channels": [64, 128, 256, 256]},
    "logvar_-6_res_96": {"model.init_logvar": -6.0, "train.resolution": 96, "data.train_short_side": [96, 192]},
    "pytorch_init": {"model.init": "pytorch"},
    # the combination the short runs point to, with and without the GAN phase
    "logvar_-6_lpips_0.25_no_gan": {"model.init_logvar": -6.0, "loss.perceptual_weight": 0.25, "loss.disc_factor": 0.0},
    # LPIPS is ~45% of a CPU step: pixel loss alone first buys more steps in the same wall-clock
    "pixel_first_600": {"model.init_logvar": -6.0, "loss.perceptual_weight": 0.25, "loss.perceptual_start": 600},
    # bf16 autocast: native bf16 dot products (AVX512-BF16 / AMX) make CPU steps cheaper
    "bf16": {"model.init_logvar": -6.0, "loss.perceptual_weight": 0.25, "train.precision": "bf16-mixed"},
    # the same through `train.precision: auto` (bf16 only where the CPU has it natively): the default
    "auto_precision": {"model.init_logvar": -6.0, "loss.perceptual_weight": 0.25, "train.precision": "auto"},
    # does the GAN phase (the last ~19% of the default's windows) cause the tints on smooth photos?
    "no_gan": {"loss.disc_factor": 0.0},
    # smooth photos lose to bicubic (flat fields come back tinted and banded): train on smooth content
    "smooth_25": {"data.smooth_share": 0.25},
    # smooth unseen photos come back with the wrong hue (a grey pier tinted, a sky the wrong blue):
    # 32 photos show few colours; grey and channel-reordered crops widen them at no cost per window
    "recolor_50": {"data.recolor_share": 0.5},
    # GroupNorm over 2 channels (tiny's 32 channels in 16 groups) maps any flat map to +-1: the
    # colour of a flat region survives only as a sign per group. Fewer, wider groups keep it.
    "groups_4": {"model.norm_num_groups": 4},
    "groups_1": {"model.norm_num_groups": 1},
    # the decoder draws the unseen photos 3 dB better from fitted latents than from the encoder's
    # (bench/quality/latent_inversion.py): the encoder's aim lags, so let it learn faster
    "encoder_lr_2": {"train.encoder_lr_scale": 2.0},
    "encoder_lr_4": {"train.encoder_lr_scale": 4.0},
    # 4x came out 1 dB worse on the unseen photos: is a steadier encoder (a latent space the
    # decoder can keep up with) the better direction?
    "encoder_lr_0.5": {"train.encoder_lr_scale": 0.5},
    "encoder_lr_0.25": {"train.encoder_lr_scale": 0.25},
    # the model fits its own training photos only 0.67 dB past bicubic, and on the smooth photos
    # half the squared error is a shift of mean colour: weigh block-mean errors as pixel errors
    "lowpass_1": {"loss.lowpass_weight": 1.0},
    "lowpass_4": {"loss.lowpass_weight": 4.0},
    # structural levers (issue: the error floor on smooth photos). The decoder amplifies the
    # encoder's small misses: train it on latents perturbed around the encoder's aim
    "latent_noise_0.25": {"loss.latent_noise": 0.25},
    "latent_noise_0.5": {"loss.latent_noise": 0.5},
    "latent_noise_0.1": {"loss.latent_noise": 0.1},
    # the encoder's aim sets most of the floor: pull it towards latents 3 Adam steps through the
    # decoder found for its own batch (semi-amortised encoding)
    "refine_3": {"loss.refine_steps": 3},
    # 64-px crops are 8x8 latents (28 of 64 positions on a border, GroupNorm over that grid); the
    # scored 128 and 256 px are not: batches at 64, 96 or 128 px, each at the same pixels
    "sizes_64_96_128": {"train.crop_sizes": [64, 96, 128]},
    # the geometry this project's seed came from (LDM kl-f4): 4x downsampling, 3 channels; scored
    # against the bicubic of its own latent size (4x down, not 8x)
    "f4c3": {"model.block_out_channels": [32, 64, 128], "model.latent_channels": 3},
}


LOADERS = ("current", "legacy")


def recipe_config(base: dict[str, Any], overrides: dict[str, Any], seed: int, steps: int) -> Config:
    data = json.loads(json.dumps(base))
    for key, value in {**overrides, "train.seed": seed, "train.max_steps": steps}.items():
        section, name = key.split(".")
        data[section][name] = value
    # disc_start keeps its share of the run, so short runs see the GAN phase too
    full = base["train"]["max_steps"] or base["train"]["plan_steps"]
    if "loss.disc_start" not in overrides and steps != full:
        data["loss"]["disc_start"] = round(base["loss"]["disc_start"] * steps / full)
    return config_from_dict(data)


@torch.no_grad()
def score(reconstruct, eval_dir: Path, lpips_net: torch.nn.Module) -> dict[str, float]:  # type: ignore[no-untyped-def]
    metrics = ReconstructionMetrics(lpips_net)
    for x in eval_batches(eval_dir, 8):
        metrics.update(x, reconstruct(x).clamp(-1, 1))
    return {k: round(float(v), 5) for k, v in metrics.compute().items() if k in METRICS}


class QualityCurve(L.Callback):
    """Scores the export weights every `every` windows; the clock stops while it scores."""

    def __init__(self, eval_dir: Path, every: int, lpips_net: torch.nn.Module) -> None:
        self.eval_dir, self.every, self.lpips_net = eval_dir, every, lpips_net
        self.rows: list[dict[str, float]] = []
        self.train_s = 0.0

    def on_train_start(self, trainer: L.Trainer, module: VAEGANModule) -> None:
        self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: VAEGANModule, *args: Any) -> None:
        done = module.windows >= module.cfg.train.max_steps
        if not module.window_done or (module.windows % self.every and not done):
            return
        self.train_s += time.perf_counter() - self.mark
        model = module.eval_autoencoder()
        was_training = model.training
        model.eval()
        row = {"step": module.windows, "train_s": round(self.train_s, 2)}
        row.update(score(model.reconstruct, self.eval_dir, self.lpips_net))
        model.train(was_training)
        self.rows.append(row)
        print(f"  {row}", flush=True)
        self.mark = time.perf_counter()


def run_one(
    cfg: Config, train_dir: Path, eval_dir: Path, every: int, lpips_net: torch.nn.Module, save: Path | None
) -> dict[str, Any]:
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    autoencoder = build_autoencoder(cfg.model, cfg.train.resolution)
    precision = measure_setup(cfg, autoencoder, lpips_net).precision  # `auto`: timed on this machine
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = VAEGANModule(cfg, autoencoder, lpips_net)
    data = ImageDataModule(
        train_dir,
        eval_dir,
        cfg.train.batch_size,
        cfg.train.resolution,
        cfg.data.train_short_side,
        0,
        1,
        cfg.train.seed,
        cfg.data.smooth_share,
        cfg.data.recolor_share,
        cfg.train.crop_sizes,
    )
    curve = QualityCurve(eval_dir, every, lpips_net)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        callbacks=[curve],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        precision=precision,
    )
    trainer.fit(module, datamodule=data)
    if save is not None:
        save_diffusers(module.eval_autoencoder(), save)
    return {"curve": curve.rows, "final": curve.rows[-1], "precision": precision}


def same_base(params: dict[str, Any], base: Config) -> bool:
    """Whether a cached run's params give the `base` configuration: a key added since (an option
    off by default) leaves the runs before it valid; a key since removed does not."""
    try:
        return config_from_dict(params) == base
    except ConfigError:
        return False


def run_label(run: dict[str, Any]) -> str:
    """Recipe name, marked when the run used the legacy loader (runs cached before the loader
    fix carry no `loader` key: they used it too)."""
    return run["recipe"] + ("" if run.get("loader", "legacy") == "current" else "/legacy_loader")


def summarize(runs: list[dict[str, Any]], baseline: dict[str, float]) -> dict[str, Any]:
    """Mean and spread (max - min) over seeds of the final scores, per recipe and step budget."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run_label(run), run["steps"]), []).append(run)
    out: dict[str, Any] = {}
    for (recipe, steps), group in sorted(groups.items()):
        row: dict[str, Any] = {"seeds": [r["seed"] for r in group], "overrides": group[0]["overrides"]}
        for m in (*METRICS, "train_s"):
            values = [r["final"][m] for r in group]
            row[m] = round(statistics.fmean(values), 4)
            row[f"{m}_spread"] = round(max(values) - min(values), 4)
        better = {"lpips": row["lpips"] < baseline["lpips"], "psnr": row["psnr"] > baseline["psnr"]}
        better["ssim"] = row["ssim"] > baseline["ssim"]
        row["beats_bicubic"] = better
        out[f"{recipe}@{steps}"] = row
    return out


def plot(runs: list[dict[str, Any]], baseline: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    names = sorted({(run_label(r), r["steps"]) for r in runs})
    seeds = {key: sum((run_label(r), r["steps"]) == key for r in runs) for key in names}
    strong, pale = iter(plt.get_cmap("tab10").colors), iter(plt.get_cmap("tab20").colors[1::2] * 2)
    for key in names:
        several = seeds[key] > 1  # solid, strong colours: the recipes run over several seeds
        style, color = ("-", next(strong)) if several else (":", next(pale))
        for j, run in enumerate(r for r in runs if (run_label(r), r["steps"]) == key):
            xs = [p["train_s"] for p in run["curve"]]
            for ax, m in zip(axes, METRICS, strict=True):
                label = f"{key[0]} ({key[1]} steps)" if j == 0 and m == "lpips" else None
                ax.plot(xs, [p[m] for p in run["curve"]], style, color=color, label=label)
    for ax, m in zip(axes, METRICS, strict=True):
        ax.axhline(baseline[m], color="black", linestyle="--", label="bicubic" if m == "lpips" else None)
        ax.set_xlabel("training wall-clock, s (evaluation excluded)")
        ax.set_title(f"eval {m.upper()} ({'lower' if m == 'lpips' else 'higher'} is better)")
        ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=7)
    fig.suptitle("Convergence on the eval set (26 photos, 128 px): one line per seed and recipe", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="default")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=None, help="windows per run (default: params.yaml)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--train", default=str(ROOT / "data/cache/train"))
    parser.add_argument("--eval", default=str(ROOT / "data/cache/eval"))
    parser.add_argument("--runs", default=str(ROOT / "metrics/convergence_runs.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--plot", default=str(ROOT / "metrics/convergence.png"))
    parser.add_argument("--save-models", default=None, help="folder for each run's EMA model (diffusers)")
    parser.add_argument("--loader", choices=LOADERS, default="current")
    parser.add_argument(
        "--precision", default=None, help="train.precision for every run (default: params.yaml's, `auto` is timed)"
    )
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print(json.dumps(RECIPES, indent=2))
        return
    import yaml

    if args.loader == "legacy":
        use_legacy_loader()  # bench/speed/legacy_loader.py
    base = yaml.safe_load(Path(args.params).read_text())
    if args.precision:  # runs side by side would time `auto` against each other
        base["train"]["precision"] = args.precision
    # a budgeted default (max_steps null) is compared at its reference length: the same windows for every recipe
    steps = args.steps or base["train"]["max_steps"] or base["train"]["plan_steps"]
    train_dir, eval_dir, runs_file = Path(args.train), Path(args.eval), Path(args.runs)
    cfg0 = config_from_dict(base)
    lpips_net = build_lpips(cfg0.weights)
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    for name in args.recipes.split(","):
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            key = {"recipe": name, "overrides": RECIPES[name], "seed": seed, "steps": steps, "params": base}
            key["loader"] = args.loader  # runs cached before the loader fix have no key: legacy
            cached = (
                all(r.get(k, "legacy" if k == "loader" else None) == v for k, v in key.items() if k != "params")
                and same_base(r["params"], cfg0)
                for r in runs
            )
            if any(cached):
                print(f"{name} seed {seed} @ {steps}: cached")
                continue
            print(f"{name} seed {seed} @ {steps}", flush=True)
            cfg = recipe_config(base, RECIPES[name], seed, steps)
            tag = "" if args.loader == "current" else f"-{args.loader}"
            save = Path(args.save_models) / f"{name}{tag}-seed{seed}-{steps}" if args.save_models else None
            result = run_one(cfg, train_dir, eval_dir, args.eval_every, lpips_net, save)
            runs.append({**key, **result})
            runs_file.parent.mkdir(parents=True, exist_ok=True)
            with runs_file.open("a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
    baseline = score(lambda x: bicubic_roundtrip(x, 8, 4), eval_dir, lpips_net)
    current = [r for r in runs if same_base(r["params"], cfg0)]
    summary = summarize(current, baseline)
    plot(current, baseline, Path(args.plot))
    entry = {
        "what": "eval-set scores (26 photos, 128 px) of the EMA weights after each recipe's run; "
        "mean and spread (max - min) over seeds; train_s excludes evaluation",
        "machine": f"{torch.get_num_threads()} CPU threads",
        "bicubic": baseline,
        "recipes": summary,
        "command": "python bench/quality/convergence.py --recipes <names> --seeds <list> --steps <n>",
    }
    store_entry(args.out, "convergence", entry)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
