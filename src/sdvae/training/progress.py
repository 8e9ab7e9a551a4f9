"""A progress bar counted in optimisation windows, with images/s and the run's ETA.

Training is step-based (`train.max_steps`), so Lightning's epoch bar ("Epoch 3/-2 ... 32/256")
says nothing useful; this bar counts windows up to `max_steps` and survives a resume.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


class StepProgressBar(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None
        self._images = 0
        self._t0 = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        total = pl_module.plan.windows  # type: ignore[attr-defined]
        self._bar = tqdm(
            total=total,
            initial=pl_module.windows,  # type: ignore[attr-defined]
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.05,
        )
        self._images, self._t0 = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += int(batch.shape[0]) * trainer.world_size
        if self._bar is None or not getattr(pl_module, "window_done", False):
            return
        self._bar.total = pl_module.plan.windows  # type: ignore[attr-defined]  # a budgeted run plans early on
        self._bar.update(pl_module.windows - self._bar.n)  # type: ignore[attr-defined]
        postfix = {"img/s": f"{self._images / max(time.perf_counter() - self._t0, 1e-9):.1f}"}
        shown = trainer.progress_bar_metrics
        for key in ("loss", "val_lpips"):
            if key in shown:
                postfix[key] = f"{float(shown[key]):.4g}"
        self._bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
