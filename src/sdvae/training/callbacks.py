"""Callbacks: atomic last.ckpt every N windows, reconstruction grids, metrics files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from litdata import StreamingDataLoader

from sdvae.imagefiles import save_rows
from sdvae.io import atomic_path, write_json
from sdvae.training.checkpoints import publish_checkpoint


def save_grid(
    inputs: torch.Tensor,
    recons: torch.Tensor,
    path: Path,
    max_images: int = 8,
    model_label: str = "model",
    caption: str | None = None,
) -> Path:
    """Two labelled rows, input above reconstruction, each image in [-1, 1]; written as PNG."""
    n = min(max_images, inputs.shape[0])
    return save_rows([inputs[:n].cpu(), recons[:n].cpu()], path, labels=["input", model_label], caption=caption)


class ClosesResumedEpoch(L.Callback):
    """Ends a resumed epoch for the StreamingDataLoader too, so the next epoch starts afresh.

    Why: after `load_state_dict` the loader sets `restore` and clears it only when its iterator
    runs to exhaustion; Lightning ends an epoch once it has counted `len(loader)` batches, without
    drawing past the last one. Left set, `restore` makes the next epoch replay the rest of the
    interrupted one (every sample after the cut seen twice), so it is cleared at each epoch end.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, StreamingDataLoader):
            loader.restore = False


class AtomicLastCheckpoint(L.Callback):
    """Writes `last.ckpt` every `plan.checkpoint_every` windows (and at the end) via a temp file +
    rename."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def _save(self, trainer: L.Trainer) -> None:
        tmp = self.dirpath / ".last.ckpt.tmp"
        # weights_only=False: keep optimizer, scheduler and loop state so a resume is exact.
        trainer.save_checkpoint(tmp, weights_only=False)  # collective: every rank calls, rank 0 writes
        if trainer.is_global_zero:
            publish_checkpoint(tmp, self.dirpath)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if getattr(pl_module, "window_done", False) and pl_module.windows % pl_module.plan.checkpoint_every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


class ValidationGrid(L.Callback):
    """Saves input | reconstruction grids of each validation and logs them to MLflow."""

    def __init__(self, outdir: str | Path, max_images: int = 8) -> None:
        self.outdir, self.max_images = Path(outdir), max_images

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end: after the module's epoch end has computed the scores the caption shows
        grid = getattr(pl_module, "val_grid", None)
        if grid is None or not trainer.is_global_zero:
            return
        scores = getattr(pl_module, "val_scores", {})
        caption = f"validation at step {pl_module.windows}/{pl_module.plan.windows}"
        shown = [f"{k.upper()} {scores[f'val/{k}']:.3f}" for k in ("lpips", "psnr", "ssim") if f"val/{k}" in scores]
        caption = " | ".join([caption, *shown])
        label = "model (EMA)" if pl_module.eval_autoencoder() is not pl_module.autoencoder else "model"
        path = save_grid(
            *grid,
            self.outdir / f"val_step{pl_module.windows:06d}.png",
            self.max_images,
            model_label=label,
            caption=caption,
        )
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id"):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="grids")


def write_history(history: list[dict[str, float]], train_csv: Path, val_csv: Path) -> None:
    """Per-step CSVs for `dvc plots`: one for training rows, one for validation rows."""
    for path, prefix in ((train_csv, "train/"), (val_csv, "val/")):
        rows = [r for r in history if any(k.startswith(prefix) for k in r)]
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", *(k.removeprefix(prefix) for k in keys)])
            for r in rows:
                w.writerow([int(r["step"]), *(f"{r[k]:.6g}" if k in r else "" for k in keys)])


def write_final_metrics(history: list[dict[str, float]], path: Path, extra: dict[str, Any]) -> None:
    last: dict[str, float] = {}
    for r in history:
        last.update({k: v for k, v in r.items() if k != "step"})
    write_json(path, {**{k.replace("/", "_"): v for k, v in last.items()}, **extra})
