"""What a run decides by timing on the machine at hand: `train.precision: auto` on a CPU, and the
window count of a budgeted run. One measurement serves both, cached per machine and workload."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdvae.config import Config
from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.training.plan import BudgetPlanner, budget_plan, phase_shares
from sdvae.training.precision import (
    CPU_CANDIDATES,
    PrecisionChoice,
    choose,
    resolve_without_measuring,
    uses_cuda,
)
from sdvae.training.step_timing import measure, phases_in_run
from sdvae.training.timing_cache import cache_file, cache_key, locked_entry, machine_identity, read_entry


@dataclass
class MeasuredSetup:
    precision: str
    choice: PrecisionChoice | None  # how `auto` was decided (None: asked for explicitly, or not a CPU)
    planner: BudgetPlanner | None  # for budgeted runs


def workload(cfg: Config, autoencoder: AutoencoderKL) -> dict[str, Any]:
    """Everything about the run that changes its step time (not its precision: entries hold both)."""
    t = cfg.train
    return {
        "autoencoder": dataclasses.asdict(autoencoder.config),
        "discriminator": dataclasses.asdict(cfg.discriminator),
        "lpips": cfg.loss.perceptual_weight > 0,
        "resolution": t.resolution,
        "batch_size": t.batch_size,
        "accumulate": t.accumulate_grad_batches,
        "gan_schedule": t.gan_schedule,
        "compile": [t.compile, t.compile_mode],
        "ema": t.ema,
        "decoder_only": t.decoder_only,
        "num_workers": t.num_workers,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "train_short_side": list(cfg.data.train_short_side),
    }


def _cache_key(cfg: Config, autoencoder: AutoencoderKL) -> str:
    device = "cuda" if uses_cuda(cfg.train.accelerator) else "cpu"
    return cache_key(machine_identity(device), workload(cfg, autoencoder))


def _missing(step_s: dict[str, dict[str, float]], precisions: list[str], phases: list[str]) -> list[str]:
    return [p for p in precisions if any(ph not in step_s.get(p, {}) for ph in phases)]


def measure_setup(cfg: Config, autoencoder: AutoencoderKL, perceptual: nn.Module | None) -> MeasuredSetup:
    """Resolve the precision and, for a budgeted run, prepare its planner."""
    t = cfg.train
    fixed = resolve_without_measuring(t.precision, t.accelerator)
    if fixed is not None and t.max_steps is not None:
        return MeasuredSetup(fixed, None, None)
    device = torch.device("cuda" if uses_cuda(t.accelerator) else "cpu")
    key = _cache_key(cfg, autoencoder)
    precisions = list(CPU_CANDIDATES) if fixed is None else [fixed]
    phases = phases_in_run(cfg)
    with locked_entry(key) as entry:  # DDP ranks on one machine: the first measures, the rest read
        step_s = entry.setdefault("step_s", {})
        todo = _missing(step_s, precisions, phases)
        cached = not todo
        if todo:
            for precision, times in measure(cfg, autoencoder, perceptual, todo, device).items():
                step_s.setdefault(precision, {}).update(times)
        step_s = {p: dict(v) for p, v in step_s.items()}
        calibration = entry.get("calibration", {})
    choice = None
    precision = fixed
    if fixed is None:
        total = t.max_steps or t.plan_steps
        choice = choose(step_s, phase_shares(cfg, total), from_cache=cached)
        precision = choice.precision
    assert precision is not None
    planner = None
    if t.max_steps is None:
        planner = BudgetPlanner(step_s[precision], key, precision, calibration.get(precision))
    return MeasuredSetup(precision, choice, planner)


def cached_decision(cfg: Config, autoencoder: AutoencoderKL) -> dict[str, Any]:
    """What this machine measured for `cfg` (for `sdvae info`), without measuring anything."""
    t = cfg.train
    fixed = resolve_without_measuring(t.precision, t.accelerator)
    if fixed is not None and t.max_steps is not None:
        return {"precision": fixed, "decided_by": "params or device (no timing)"}
    entry = read_entry(_cache_key(cfg, autoencoder))
    out: dict[str, Any] = {"timing_cache": str(cache_file())}
    step_s = entry.get("step_s", {})
    if fixed is None:
        if _missing(step_s, list(CPU_CANDIDATES), phases_in_run(cfg)):
            out["precision"] = "not timed on this machine yet: training times it first (a few seconds)"
        else:
            out.update(choose(step_s, phase_shares(cfg, t.max_steps or t.plan_steps), True).as_record())
    else:
        out["precision"] = fixed
    if t.max_steps is None:
        precision = fixed or out.get("precision")
        calibration = entry.get("calibration", {}).get(precision)
        if calibration is None or precision not in step_s:
            out["plan"] = "not timed on this machine yet: training plans after its first 20 windows"
        else:
            out["plan"] = budget_plan(cfg, step_s[precision], calibration).as_record()
    return out
