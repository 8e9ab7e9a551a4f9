"""How long a run is, and when its schedule switches: fixed by `train.max_steps`, or planned to a
wall-clock budget (`train.max_steps: null`, `train.time_budget_s`).

Why plan: a fixed window count is a fixed time only on the machine it was tuned on; the same
1,600 windows took 12 minutes on one CPU and 37 on another. A budgeted run times its real
windows, then picks the window count that fills the budget, and scales every step-valued part
of the schedule (GAN start, LPIPS start, validation and checkpoint cadence, the LR schedule's
length) by planned / `train.plan_steps`, so the run keeps its shape at any length.

How the time per window is known: `step_timing` times one step of each phase (pixel-only,
LPIPS, GAN) on copies before training; the first windows of the real run (windows 5-20, which
include data loading, the optimizer and EMA) calibrate those against the trainer's real cost.
The expected window then weighs each phase by its share of the run. The calibration is cached
per machine and workload (`timing_cache`), so the same machine plans the same run every time,
and a cached run plans before its first window. The window count is rounded down to two
significant digits (1,637 -> 1,600). The budget covers training windows; validation, checkpoints
and start-up come on top. The plan is stored in every checkpoint: a resumed run continues the same
plan, whatever a timing on the machine that resumes it would say.

A cached calibration is checked against the run's own windows 5-20: when the two differ by more
than `CALIBRATION_TOLERANCE` (a calibration taken on a busy machine, or a machine that changed),
the run re-plans from its own timing and the cache keeps the new figure, with when and how it
was taken. Under DDP, global rank 0 decides and broadcasts at fixed points that every rank
reaches alike, whatever each rank's local cache holds (`run.RunBookkeeping.setup` first hands every
rank rank 0's timings).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import lightning as L

from sdvae.config import Config
from sdvae.training.precision import window_seconds
from sdvae.training.timing_cache import locked_entry

MIN_WINDOWS = 10
SKIPPED_WINDOWS = 5  # warm-up (allocator, first-call kernels, compilation) before timing
TIMED_WINDOWS = 15
CALIBRATION_TOLERANCE = 1.5  # a cached calibration off the run's own by more than this factor is replaced
MAX_WARMUP_SHARE = 0.25  # a planned LR warm-up never takes more than this share of the windows


@dataclass(frozen=True)
class TrainingPlan:
    windows: int
    disc_start: int
    perceptual_start: int
    val_every: int
    checkpoint_every: int
    scale: float = 1.0
    budgeted: bool = False  # the window count comes from train.time_budget_s
    final: bool = True  # False: a budgeted run's provisional plan until its windows are timed
    window_s: float | None = None  # expected seconds per window (budgeted runs)
    calibration: float | None = None  # real window / timed step
    warmup: int | None = None  # LR warm-up steps (None: a checkpoint from before warm-up was planned)

    def optimizer_steps(self, gan_schedule: str, gan_on: bool) -> tuple[int, int]:
        """(generator steps, discriminator steps) the run makes: each LR schedule's length."""
        n, start = self.windows, min(self.disc_start, self.windows)
        if not gan_on:
            return n, 0
        if gan_schedule == "both":
            return n, n - start
        # alternate: after disc_start, G on even windows and D on odd ones; the odd windows in
        # [start, n) number n // 2 - start // 2 (the LR schedules read this at every step)
        d = n // 2 - start // 2
        return n - d, d

    def as_record(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def fixed_plan(cfg: Config) -> TrainingPlan:
    """`train.max_steps` windows, with the step-valued params exactly as written."""
    t, loss = cfg.train, cfg.loss
    assert t.max_steps is not None
    return TrainingPlan(
        t.max_steps, loss.disc_start, loss.perceptual_start, t.val_every, t.checkpoint_every, warmup=t.warmup_steps
    )


def scaled_warmup(warmup_steps: int, scale: float, windows: int) -> int:
    """`warmup_steps` scaled like every other step-valued param, with a floor of one step (a
    warm-up asked for never vanishes) and a ceiling of `MAX_WARMUP_SHARE` of the run, so the
    cosine always has most of the run to decay over."""
    if warmup_steps <= 0:
        return 0
    return max(1, min(round(warmup_steps * scale), int(windows * MAX_WARMUP_SHARE)))


def scaled_plan(cfg: Config, windows: int, **measured: Any) -> TrainingPlan:
    t, loss = cfg.train, cfg.loss
    s = windows / t.plan_steps
    return TrainingPlan(
        windows,
        round(loss.disc_start * s),
        round(loss.perceptual_start * s),
        max(1, round(t.val_every * s)),
        max(1, round(t.checkpoint_every * s)),
        round(s, 6),
        budgeted=True,
        warmup=scaled_warmup(t.warmup_steps, s, windows),
        **measured,
    )


def initial_plan(cfg: Config) -> TrainingPlan:
    """A fixed run's plan (as written, or scaled by `scale_schedule`), or a budgeted run's
    provisional one (its reference length, unscaled)."""
    if cfg.train.max_steps is not None:
        if cfg.train.scale_schedule:  # a budgeted plan of max_steps windows, replayed without timing
            return dataclasses.replace(scaled_plan(cfg, cfg.train.max_steps), budgeted=False)
        return fixed_plan(cfg)
    return dataclasses.replace(scaled_plan(cfg, cfg.train.plan_steps), final=False)


def gan_window_weight(cfg: Config) -> float:
    """A GAN window's cost in timed GAN steps (G and D): under `alternate` a window trains one of
    the two, counted as half. The plan's shares and the planner's calibration use this one weight,
    so the approximation cannot compound (counted once as a half, once as a whole, a run
    overran its budget up to 2x)."""
    return 0.5 if cfg.train.gan_schedule == "alternate" else 1.0


def phase_shares(cfg: Config, total: int) -> dict[str, float]:
    """Share of a `total`-window run spent in each phase, a GAN window weighed by `gan_window_weight`."""
    loss = cfg.loss
    pixel = 1.0 if loss.perceptual_weight <= 0 else min(loss.perceptual_start, total) / total
    gan = max(0, total - loss.disc_start) / total if loss.disc_factor > 0 else 0.0
    pixel = min(pixel, 1.0 - gan)
    shares = {"pixel": pixel, "perceptual": max(0.0, 1.0 - pixel - gan), "gan": gan}
    shares["gan"] *= gan_window_weight(cfg)
    return shares


def run_shares(cfg: Config) -> dict[str, float]:
    """The phase shares of the run as it will be planned: a scaled schedule (budgeted, or
    `scale_schedule`) keeps the shares it has at `plan_steps`; a fixed one has them at `max_steps`."""
    t = cfg.train
    return phase_shares(cfg, t.plan_steps if t.max_steps is None or t.scale_schedule else t.max_steps)


def round_down(n: int, digits: int = 2) -> int:
    """`n` rounded down to `digits` significant digits, so timing noise rarely moves the plan."""
    if n < 10**digits:
        return n
    unit = 10 ** (len(str(n)) - digits)
    return n // unit * unit


def budget_plan(cfg: Config, step_s: dict[str, float], calibration: float, done: int = 0) -> TrainingPlan:
    """The most windows (two significant digits, at least MIN_WINDOWS and more than `done`) whose
    expected time fits `train.time_budget_s`."""
    per_window = calibration * window_seconds(step_s, phase_shares(cfg, cfg.train.plan_steps))
    windows = max(MIN_WINDOWS, done + 1, round_down(int(cfg.train.time_budget_s / per_window)))
    return scaled_plan(cfg, windows, window_s=per_window, calibration=calibration)


def calibration_record(value: float, replaced: float | None) -> dict[str, Any]:
    """How a calibration was taken, for the timing cache and `sdvae info`."""
    return {
        "value": round(value, 6),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "how": f"windows {SKIPPED_WINDOWS}-{SKIPPED_WINDOWS + TIMED_WINDOWS} of a run, validation excluded",
        **({"replaced": round(replaced, 6)} if replaced is not None else {}),
    }


def trusted(cached: float, measured: float) -> bool:
    """Whether a cached calibration agrees with the run's own within `CALIBRATION_TOLERANCE`."""
    return 1 / CALIBRATION_TOLERANCE <= measured / cached <= CALIBRATION_TOLERANCE


class BudgetPlanner(L.Callback):
    """Plans a budgeted run: at once from this machine's cached calibration (then checked against
    the run's own windows), else after timing `TIMED_WINDOWS` real windows. A plan restored from a
    checkpoint is kept as it is: no timing changes a run once it has one."""

    def __init__(self, step_s: dict[str, float], cache_key: str, precision: str, calibration: float | None) -> None:
        self.step_s, self.cache_key, self.precision, self.calibration = step_s, cache_key, precision, calibration
        self.start: int | None = None  # first window of the timed span; None: not timing
        self.t0 = 0.0
        self.expected = 0.0  # timed step seconds of the windows timed so far
        self.excluded = 0.0  # validation time inside the timed span
        self.replanned: dict[str, Any] | None = None  # set when a cached calibration was replaced
        self._phase = "perceptual"
        self._val_t0 = 0.0

    def adopt(self, step_s: dict[str, float], calibration: float | None, precision: str) -> None:
        """Take global rank 0's timings, so every rank takes the same branches (and collectives)."""
        self.step_s, self.calibration, self.precision = step_s, calibration, precision

    def _apply(self, trainer: L.Trainer, module: Any, plan: TrainingPlan) -> None:
        if trainer.is_global_zero and plan != module.plan:
            print(
                f"planned {plan.windows} windows for train.time_budget_s {module.cfg.train.time_budget_s:g} "
                f"({plan.window_s:.3f} s per window; GAN from window {plan.disc_start}, validation every "
                f"{plan.val_every}, checkpoint every {plan.checkpoint_every})",
                flush=True,
            )
        module.plan = plan
        # the trainer's validation cadence is set once at fit start; the plan may change it
        trainer.val_check_batch = plan.val_every * module.cfg.train.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if module.plan.final:  # a fixed run, or a plan restored from the checkpoint
            self._apply(trainer, module, module.plan)
            return
        if self.calibration is not None:
            plan = budget_plan(module.cfg, self.step_s, self.calibration, module.windows)
            self._apply(trainer, module, trainer.strategy.broadcast(plan, src=0))
        self.start = module.windows  # timed either way: a cached calibration is checked

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: object) -> None:
        if module.micro == 0:
            self._phase = module.phase

    def on_validation_start(self, trainer: L.Trainer, module: Any) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: Any) -> None:
        if self.start is not None:
            self.excluded += time.perf_counter() - self._val_t0

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: object) -> None:
        if self.start is None or not module.window_done:
            return
        done = module.windows - self.start
        if done == SKIPPED_WINDOWS:
            self.t0, self.expected, self.excluded = time.perf_counter(), 0.0, 0.0
            return
        if done < SKIPPED_WINDOWS:
            return
        weight = gan_window_weight(module.cfg) if self._phase == "gan" else 1.0
        self.expected += self.step_s[self._phase] * weight
        if done < SKIPPED_WINDOWS + TIMED_WINDOWS:
            return
        self.start = None
        measured = (time.perf_counter() - self.t0 - self.excluded) / self.expected
        cached = self.calibration
        # rank 0's timing decides; every rank makes this one broadcast at this window
        measured = float(trainer.strategy.broadcast(measured, src=0))
        if cached is not None and trusted(cached, measured):
            return
        plan = budget_plan(module.cfg, self.step_s, measured, module.windows)
        if trainer.is_global_zero:
            if cached is not None:
                self.replanned = {"cached": round(cached, 6), "measured": round(measured, 6)}
                print(
                    f"the cached calibration ({cached:.3f}) is off this run's own ({measured:.3f}) by more than "
                    f"{CALIBRATION_TOLERANCE}x: re-planned, and the cache now holds the new figure",
                    flush=True,
                )
            with locked_entry(self.cache_key) as entry:
                entry.setdefault("calibration", {})[self.precision] = plan.calibration
                entry.setdefault("calibration_record", {})[self.precision] = calibration_record(measured, cached)
        self._apply(trainer, module, plan)
