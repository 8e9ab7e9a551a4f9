"""Wire config, data, model, MLflow and the Lightning Trainer into one resumable training run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric

from sdvae.config import Config, TrackingConfig
from sdvae.data.datamodule import ImageDataModule
from sdvae.formats import load_any
from sdvae.formats.diffusers import save_diffusers
from sdvae.formats.ldm import carries_factors
from sdvae.io import write_json
from sdvae.metrics import build_lpips
from sdvae.models.factory import build_autoencoder, with_family_factors
from sdvae.tracking import DVC_EXP_NAME, experiment_tags, mark_model_training, resolve_store, store_lock
from sdvae.training.callbacks import (
    AtomicLastCheckpoint,
    ClosesResumedEpoch,
    ValidationGrid,
    write_final_metrics,
    write_history,
)
from sdvae.training.checkpoints import resumable_checkpoint
from sdvae.training.compiling import check_compile_supported
from sdvae.training.measured import measure_setup
from sdvae.training.module import VAEGANModule, freeze_encoder
from sdvae.training.plan import TrainingPlan
from sdvae.training.precision import PrecisionChoice, uses_cuda
from sdvae.training.progress import StepProgressBar
from sdvae.training.trainer import build_trainer


@dataclass(frozen=True)
class TrainPaths:
    train_cache: Path = Path("data/cache/train")
    eval_cache: Path = Path("data/cache/eval")
    checkpoints: Path = Path("checkpoints")
    out: Path = Path("models/train")
    grids: Path = Path("outputs/grids")
    metrics: Path = Path("metrics/train.json")
    train_csv: Path = Path("metrics/train_steps.csv")
    val_csv: Path = Path("metrics/val_steps.csv")

    @classmethod
    def under(cls, folder: Path, caches: Path) -> TrainPaths:
        """Every output in one folder, the caches in `caches` (train/, eval/): benches and tests."""
        return cls(
            train_cache=caches / "train",
            eval_cache=caches / "eval",
            checkpoints=folder / "ckpt",
            out=folder / "out",
            grids=folder / "grids",
            metrics=folder / "train.json",
            train_csv=folder / "train.csv",
            val_csv=folder / "val.csv",
        )


def tracking_uri(cfg: TrackingConfig) -> str:
    return resolve_store(cfg.uri)[0]


def run_fingerprint(cfg: Config, paths: TrainPaths) -> str:
    """What a checkpoint must match to be resumed: training-relevant params + the data caches."""
    relevant = {k: v for k, v in cfg.to_dict().items() if k in ("data", "model", "loss", "discriminator", "train")}
    for split in (paths.train_cache, paths.eval_cache):
        manifest = split / "manifest.json"
        relevant[str(split)] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _resume_state(paths: TrainPaths, fingerprint: str) -> tuple[Path | None, str | None, bool]:
    """(checkpoint to resume, MLflow run id to continue, whether stale checkpoints must go).

    Pure, so every rank reaches the same answer; only global rank 0 removes anything, once the
    ranks are known (`RunBookkeeping.setup`)."""
    meta_file = paths.checkpoints / "run.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("fingerprint") != fingerprint:
        return None, None, paths.checkpoints.exists()
    return resumable_checkpoint(paths.checkpoints), meta.get("run_id"), False


class RunBookkeeping(L.Callback):
    """Global rank 0's one-off writes: drop stale checkpoints, log params, record the run.

    Why in `setup`: before `fit` sets up the process group, a process of node 1 started with
    NODE_RANK=1 still reports global rank 0, and two processes creating the MLflow run race on
    the database. `setup` runs after the ranks are set and before any checkpoint is restored.
    """

    def __init__(
        self, cfg: Config, paths: TrainPaths, logger: MLFlowLogger, fingerprint: str, new_run: bool, stale: bool
    ) -> None:
        self.cfg, self.paths, self.logger, self.fingerprint = cfg, paths, logger, fingerprint
        self.new_run, self.stale = new_run, stale

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            if self.stale:
                print(f"checkpoints in {self.paths.checkpoints} belong to other params or data: starting afresh")
                shutil.rmtree(self.paths.checkpoints)
            self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            if self.new_run:  # the first use creates the experiment and the run: one process at a time
                with store_lock(tracking_uri(self.cfg.tracking)):
                    self.logger.log_hyperparams(self.cfg.flat())
                    mark_model_training(self.logger.experiment, self.logger.experiment_id)
            record = {
                "fingerprint": self.fingerprint,
                "run_id": self.logger.run_id,
                "tracking_uri": tracking_uri(self.cfg.tracking),
            }
            write_json(self.paths.checkpoints / "run.json", record)
        trainer.strategy.barrier("sdvae-bookkeeping")


def log_plan(logger: MLFlowLogger, plan: TrainingPlan, choice: PrecisionChoice | None) -> None:
    """The run's plan and, for `auto`, both precisions' timed windows, as MLflow metrics."""
    values = {f"plan/{k}": float(v) for k, v in plan.as_record().items() if v is not None}
    if choice is not None:
        values.update({f"precision/{k}": float(v) for k, v in choice.as_record().items() if k != "precision"})
    logger.experiment.log_batch(
        logger.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in sorted(values.items())]
    )


def train(cfg: Config, paths: TrainPaths = TrainPaths()) -> dict[str, Any]:
    """Train (or resume) and write the raw and EMA autoencoders as diffusers folders."""
    if cfg.train.compile:
        check_compile_supported(uses_cuda(cfg.train.accelerator))
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if cfg.train.init_from:  # a diffusers folder (with its config), or a single LDM/SD/FLUX file
        autoencoder = load_any(cfg.train.init_from)
        if Path(cfg.train.init_from).is_file() and not carries_factors(cfg.train.init_from):
            # a file from elsewhere: its family's factors (files we write carry their own)
            autoencoder.config = with_family_factors(autoencoder.config, cfg.model, cfg.train.init_from)
        autoencoder.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
    else:
        autoencoder = build_autoencoder(cfg.model, cfg.train.resolution)
    perceptual = build_lpips(cfg.weights)
    if cfg.train.decoder_only:  # as the module will, so the timed step matches the run's
        freeze_encoder(autoencoder)
    measured = measure_setup(cfg, autoencoder, perceptual)
    precision = measured.precision
    if measured.choice is not None:
        times = ", ".join(f"{p} {s:.3f} s" for p, s in measured.choice.window_s.items())
        cached = " (cached for this machine)" if measured.choice.from_cache else ""
        print(f"train.precision auto -> {precision} on this machine: timed window {times}{cached}")
    if precision != cfg.train.precision:
        # the resolved value is what MLflow records and what a checkpoint must match to resume
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    fingerprint = run_fingerprint(cfg, paths)
    resume, run_id, stale = _resume_state(paths, fingerprint)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)  # the timing drew random numbers
    module = VAEGANModule(cfg, autoencoder, perceptual)
    datamodule = ImageDataModule(
        paths.train_cache,
        paths.eval_cache,
        cfg.train.batch_size,
        cfg.train.resolution,
        cfg.data.train_short_side,
        cfg.train.num_workers,
        cfg.train.val_images,
        cfg.train.seed,
        cfg.data.smooth_share,
        cfg.data.recolor_share,
    )
    uri, artifacts = resolve_store(cfg.tracking.uri)
    with store_lock(uri):  # the logger opens the store (and may create the schema) right here
        logger = MLFlowLogger(
            experiment_name=cfg.tracking.experiment,
            tracking_uri=uri,
            run_name=cfg.tracking.run_name or os.environ.get(DVC_EXP_NAME),
            run_id=run_id,
            log_model=False,
            artifact_location=artifacts,
            tags=experiment_tags() or None,
        )
    callbacks = [
        RunBookkeeping(cfg, paths, logger, fingerprint, new_run=run_id is None, stale=stale),
        *([measured.planner] if measured.planner is not None else []),
        AtomicLastCheckpoint(paths.checkpoints),
        ValidationGrid(paths.grids, cfg.eval.grid_images),
        StepProgressBar(),
        ClosesResumedEpoch(),
    ]
    trainer = build_trainer(cfg, logger, callbacks)
    if resume is not None:
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    # how the run's length and precision were decided: in the result and in metrics/train.json
    decided = {
        "plan": module.plan.as_record(),
        **({"precision_timing": measured.choice.as_record()} if measured.choice is not None else {}),
        **({"eq_steps": module.eq_steps} if module.equivariance.enabled else {}),
    }
    result = {
        "run_id": logger.run_id,
        "tracking_uri": uri,
        "default_store": artifacts is not None,
        "windows": module.windows,
        "g_steps": module.g_steps,
        "d_steps": module.d_steps,
        "skipped_steps": module.bad_steps,
        "resumed": resume is not None,
        "precision": precision,
        **decided,
    }
    if trainer.is_global_zero:
        raw = module.autoencoder
        save_diffusers(raw, paths.out / "vae")
        if module.ema is not None:
            save_diffusers(module.ema.module, paths.out / "vae_ema")
        elif (paths.out / "vae_ema").exists():
            shutil.rmtree(paths.out / "vae_ema")
        write_json(paths.out / "run.json", result)
        write_history(module.history, paths.train_csv, paths.val_csv)
        write_final_metrics(
            module.history,
            paths.metrics,
            {
                "steps": module.windows,
                "g_steps": module.g_steps,
                "d_steps": module.d_steps,
                "skipped_steps": module.bad_steps,
                **decided,
            },
        )
        logger.experiment.log_metric(logger.run_id, "train/final_windows", module.windows, step=module.windows)
        log_plan(logger, module.plan, measured.choice)
        for f in (paths.metrics, paths.train_csv, paths.val_csv):
            logger.experiment.log_artifact(logger.run_id, str(f), artifact_path="metrics")
    return result
