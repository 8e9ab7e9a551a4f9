"""The Lightning Trainer every training run uses, apart from tracking (which needs MLflow)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from sdvae.config import Config
from sdvae.training.plan import initial_plan


def build_trainer(cfg: Config, logger: Any, callbacks: list[L.Callback]) -> L.Trainer:
    t = cfg.train
    strategy: Any = t.strategy
    if t.strategy == "ddp":
        # G and D take turns: the idle network's parameters get no gradient in a window.
        strategy = DDPStrategy(find_unused_parameters=True, start_method="popen")
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_epochs=-1,
        max_steps=-1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        check_val_every_n_epoch=None,
        # a budgeted run's planner resets this once the run's length is known
        val_check_interval=initial_plan(cfg).val_every * t.accumulate_grad_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_model_summary=False,
        deterministic=False,
        default_root_dir="outputs",
    )
