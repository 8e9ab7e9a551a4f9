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

from sdvae.config import Config
from sdvae.data.datamodule import ImageDataModule
from sdvae.formats.diffusers import save_diffusers
from sdvae.io import write_json
from sdvae.metrics import build_lpips
from sdvae.tracking import (
    DVC_EXP_NAME,
    experiment_tags,
    holds_run,
    mark_model_training,
    resolve_store,
    store_lock,
)
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
from sdvae.training.plan import BudgetPlanner, TrainingPlan
from sdvae.training.precision import PrecisionChoice, precision_plugin, uses_cuda
from sdvae.training.progress import StepProgressBar
from sdvae.training.starting import starting_autoencoder
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


def run_fingerprint(cfg: Config, paths: TrainPaths) -> str:
    """What a checkpoint must match to be resumed: training-relevant params as the user wrote them
    (`train.precision: auto` stays `auto`: what a timing resolved it to is the run's own decision,
    kept in its record) + which weights validation scores + the data caches."""
    data = cfg.to_dict()
    relevant = {k: v for k, v in data.items() if k in ("data", "model", "loss", "discriminator", "train")}
    relevant["eval.use_ema"] = data["eval"]["use_ema"]
    for split in (paths.train_cache, paths.eval_cache):
        manifest = split / "manifest.json"
        relevant[str(split)] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResumeState:
    checkpoint: Path | None  # to resume from
    run_id: str | None  # the MLflow run to continue
    stale: bool  # checkpoints of other params or data are there: set aside before training
    precision: str | None  # the precision the run decided when it started (None: decide now)
    tracking_uri: str | None = None  # the store that holds run_id when it was recorded


def _resume_state(paths: TrainPaths, fingerprint: str) -> ResumeState:
    """Pure, so every rank reaches the same answer; only global rank 0 moves anything, once the
    ranks are known (`RunBookkeeping.setup`)."""
    meta_file = paths.checkpoints / "run.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("fingerprint") != fingerprint:
        return ResumeState(None, None, any(_kept(paths.checkpoints)), None)
    checkpoint = resumable_checkpoint(paths.checkpoints)
    precision = meta.get("precision") if checkpoint else None
    return ResumeState(checkpoint, meta.get("run_id"), False, precision, meta.get("tracking_uri"))


def continued_run(state: ResumeState, uri: str, artifacts: str | None) -> tuple[ResumeState, str, str | None]:
    """The MLflow run a resume continues and its store (uri, artifact location). The run's record
    decides, not where the store resolves today: a `dvc repro` in a queued experiment's copy, or
    a changed `tracking.uri`, must not cost the checkpoints (MLflow raises on an unknown run id).
    A run that no store holds any more gets a new run in today's store, and says so."""
    if state.run_id is None:
        return state, uri, artifacts
    for store in dict.fromkeys((state.tracking_uri or uri, uri)):
        if holds_run(store, state.run_id):
            if store != uri:
                print(f"continuing MLflow run {state.run_id} in {store}, where it started (not {uri})")
            return state, store, artifacts if store == uri else None
    print(f"MLflow run {state.run_id} is in no store any more: the resumed training logs to a new run in {uri}")
    return dataclasses.replace(state, run_id=None), uri, artifacts


STALE = "stale"  # under the checkpoint folder: runs of other params, kept aside, never resumed


def _kept(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != STALE] if folder.is_dir() else []


def set_aside(folder: Path) -> Path:
    """Move a run's checkpoints (of other params or data) into `folder/stale/<time>/`: a new run
    never deletes what an earlier one wrote."""
    target = folder / STALE / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{n}")
    target.mkdir(parents=True)
    for item in _kept(folder):
        os.replace(item, target / item.name)
    return target


class RunBookkeeping(L.Callback):
    """Global rank 0's decisions and one-off writes: hand every rank rank 0's precision and timings,
    set stale checkpoints aside, log params, record the run.

    Why in `setup`: before `fit` sets up the process group, a process of node 1 started with
    NODE_RANK=1 still reports global rank 0, and two processes creating the MLflow run race on
    the database. `setup` runs on every rank after the ranks are set, before any checkpoint is
    restored and before the precision plugin is bound to the model: the one fixed point where
    rank 0's decisions can replace a rank's own.
    """

    def __init__(
        self,
        cfg: Config,
        paths: TrainPaths,
        logger: MLFlowLogger,
        store: str,
        fingerprint: str,
        state: ResumeState,
        planner: BudgetPlanner | None,
    ) -> None:
        self.cfg, self.paths, self.logger, self.store, self.fingerprint = cfg, paths, logger, store, fingerprint
        self.state, self.planner = state, planner
        self.set_aside_to: Path | None = None

    def _agree(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Every rank takes rank 0's precision and timings (its own cache may hold others, or none)."""
        mine = {
            "precision": self.cfg.train.precision,
            "timings": (self.planner.step_s, self.planner.calibration) if self.planner is not None else None,
        }
        decided = trainer.strategy.broadcast(mine, src=0)
        resumes = trainer.strategy.reduce_boolean_decision(self.state.checkpoint is not None, all=True)
        starts = not trainer.strategy.reduce_boolean_decision(self.state.checkpoint is not None, all=False)
        if not (resumes or starts):
            raise RuntimeError(
                "some ranks found a checkpoint of this run to resume and others did not: give every node "
                f"the same {self.paths.checkpoints} (shared storage), or remove it on every node to start afresh"
            )
        if decided["precision"] != mine["precision"]:
            print(
                f"rank {trainer.global_rank}: precision {mine['precision']} resolved here, "
                f"{decided['precision']} on rank 0: using rank 0's",
                flush=True,
            )
            trainer.strategy.precision_plugin = precision_plugin(decided["precision"], trainer.strategy.root_device)
            self.cfg = dataclasses.replace(
                self.cfg, train=dataclasses.replace(self.cfg.train, precision=decided["precision"])
            )
            module.cfg = self.cfg  # type: ignore[assignment]
        if self.planner is not None and decided["timings"] is not None:
            step_s, calibration = decided["timings"]
            self.planner.adopt(step_s, calibration, decided["precision"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._agree(trainer, pl_module)
        if trainer.is_global_zero:
            if self.state.stale:
                self.set_aside_to = set_aside(self.paths.checkpoints)
                print(
                    f"checkpoints in {self.paths.checkpoints} belong to other params or data: starting afresh; "
                    f"they are kept in {self.set_aside_to} (delete it when no longer needed)"
                )
            self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            if self.state.run_id is None:  # the first use creates the experiment and the run: one process at a time
                with store_lock(self.store):
                    self.logger.log_hyperparams(self.cfg.flat())
                    mark_model_training(self.logger.experiment, self.logger.experiment_id)
            record = {
                "fingerprint": self.fingerprint,
                "run_id": self.logger.run_id,
                "tracking_uri": self.store,  # where the run is: a resume continues it there
                # decided once, when the run started: a resume takes it from here, never from a timing
                "precision": self.cfg.train.precision,
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
    autoencoder = starting_autoencoder(cfg)
    perceptual = build_lpips(cfg.weights)
    if cfg.train.decoder_only:  # as the module will, so the timed step matches the run's
        freeze_encoder(autoencoder)
    fingerprint = run_fingerprint(cfg, paths)  # the params as written: a timing cannot make a run stale
    state = _resume_state(paths, fingerprint)
    resume, run_id = state.checkpoint, state.run_id
    measured = measure_setup(cfg, autoencoder, perceptual, decided=state.precision)
    precision = measured.precision
    if state.precision is not None and cfg.train.precision != state.precision:
        print(f"train.precision {cfg.train.precision} -> {precision}: as decided when this run started")
    if measured.choice is not None:
        times = ", ".join(f"{p} {s:.3f} s" for p, s in measured.choice.window_s.items())
        cached = " (cached for this machine)" if measured.choice.from_cache else ""
        print(f"train.precision auto -> {precision} on this machine: timed window {times}{cached}")
    if precision != cfg.train.precision:  # the resolved value is what MLflow and the run's record keep
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
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
        cfg.train.crop_sizes,
    )
    state, uri, artifacts = continued_run(state, *resolve_store(cfg.tracking.uri))
    run_id = state.run_id
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
    bookkeeping = RunBookkeeping(cfg, paths, logger, uri, fingerprint, state, measured.planner)
    callbacks = [
        bookkeeping,
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
    planner = measured.planner
    decided = {
        "plan": module.plan.as_record(),
        **({"precision_timing": measured.choice.as_record()} if measured.choice is not None else {}),
        **({"eq_steps": module.eq_steps} if module.equivariance.enabled else {}),
        **({"calibration_replaced": planner.replanned} if planner is not None and planner.replanned else {}),
        **({"checkpoints_set_aside": str(bookkeeping.set_aside_to)} if bookkeeping.set_aside_to else {}),
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
