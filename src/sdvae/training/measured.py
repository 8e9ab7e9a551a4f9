"""What a run decides by timing on the machine at hand: `train.precision: auto` on a CPU, and the
window count of a budgeted run. One measurement serves both, cached per machine and workload."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn

from sdvae.config import Config
from sdvae.models.autoencoder_kl import AutoencoderKL
from sdvae.training.plan import BudgetPlanner, budget_plan, run_shares
from sdvae.training.precision import (
    BF16_MARGIN,
    CPU_CANDIDATES,
    PrecisionChoice,
    choose,
    resolve_without_measuring,
    uses_cuda,
    window_seconds,
)
from sdvae.training.step_timing import measure, phases_in_run
from sdvae.training.timing_cache import (
    cache_file,
    cache_key,
    forget_entry,
    locked_entry,
    machine_identity,
    read_entry,
)

NEAR_MARGIN = 0.05  # within 5% of BF16_MARGIN, a precision choice is timed again before it is kept


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
        # processes and how they talk: gradient all-reduce and rank count change a window's time
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": t.strategy,
        # the equivariance pair is an extra decode and LPIPS on this share of the steps
        "equivariance": [cfg.loss.equivariance, list(cfg.loss.equivariance_scale), cfg.loss.equivariance_rotate],
        # semi-amortised encoding: a decode forward and backward per refinement step
        "refine_steps": cfg.loss.refine_steps,
        "crop_sizes": list(cfg.train.crop_sizes or []),
    }


def timing_device(accelerator: str) -> str:
    """The device kind the run's timings belong to (an `mps` machine is not its own CPU)."""
    if uses_cuda(accelerator):
        return "cuda"
    return "mps" if accelerator == "mps" else "cpu"


def _cache_key(cfg: Config, autoencoder: AutoencoderKL) -> str:
    device = timing_device(cfg.train.accelerator)
    return cache_key({**machine_identity(device), "device": device}, workload(cfg, autoencoder))


def step_record(rounds: int) -> dict[str, Any]:
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "how": f"median of {rounds} interleaved rounds of one training step per phase, after a warm-up",
    }


def near_margin(step_s: dict[str, dict[str, float]], shares: dict[str, float]) -> bool:
    """Whether bf16's speed-up lies so close to `BF16_MARGIN` that timing noise could flip the choice."""
    per = {p: window_seconds(step_s[p], shares) for p in CPU_CANDIDATES}
    return abs(per["32"] / per["bf16-mixed"] / BF16_MARGIN - 1) < NEAR_MARGIN


def _missing(step_s: dict[str, dict[str, float]], precisions: list[str], phases: list[str]) -> list[str]:
    return [p for p in precisions if any(ph not in step_s.get(p, {}) for ph in phases)]


def measure_setup(
    cfg: Config, autoencoder: AutoencoderKL, perceptual: nn.Module | None, decided: str | None = None
) -> MeasuredSetup:
    """Resolve the precision and, for a budgeted run, prepare its planner. `decided`: the precision a
    resumed run's record holds, which no timing on this machine may change."""
    t = cfg.train
    fixed = decided or resolve_without_measuring(t.precision, t.accelerator)
    if fixed is not None and t.max_steps is not None:
        return MeasuredSetup(fixed, None, None)
    device = torch.device("cuda" if uses_cuda(t.accelerator) else "cpu")
    key = _cache_key(cfg, autoencoder)
    precisions = list(CPU_CANDIDATES) if fixed is None else [fixed]
    phases = phases_in_run(cfg)
    shares = run_shares(cfg)
    with locked_entry(key) as entry:  # DDP ranks on one machine: the first measures, the rest read
        step_s = entry.setdefault("step_s", {})
        todo = _missing(step_s, precisions, phases)
        cached = not todo
        if todo:
            rounds = 3
            measured = measure(cfg, autoencoder, perceptual, todo, device, rounds)
            if fixed is None and set(todo) == set(CPU_CANDIDATES) and near_margin(measured, shares):
                rounds = 9  # a choice that noise could flip is timed again, longer, before it is kept
                measured = measure(cfg, autoencoder, perceptual, todo, device, rounds)
            for precision, times in measured.items():
                # only the missing phases: a calibration already cached was taken against the others
                for phase, seconds in times.items():
                    step_s.setdefault(precision, {}).setdefault(phase, seconds)
                entry.setdefault("step_record", {})[precision] = step_record(rounds)
        step_s = {p: dict(v) for p, v in step_s.items()}
        calibration = entry.get("calibration", {})
    choice = None
    precision = fixed
    if fixed is None:
        choice = choose(step_s, shares, from_cache=cached)
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
    for record in ("step_record", "calibration_record"):  # when and how each figure was taken
        if record in entry:
            out[record] = entry[record]
    if fixed is None:
        if _missing(step_s, list(CPU_CANDIDATES), phases_in_run(cfg)):
            out["precision"] = "not timed on this machine yet: training times it first (a few seconds)"
        else:
            out.update(choose(step_s, run_shares(cfg), True).as_record())
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


def forget_timings(cfg: Config, autoencoder: AutoencoderKL) -> bool:
    """Drop this machine's timings and calibration for `cfg` (`sdvae info --retime`): the next run
    measures afresh. Runs already started keep their decisions (they live in their checkpoints)."""
    return forget_entry(_cache_key(cfg, autoencoder))
