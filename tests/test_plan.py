"""Budgeted runs: the window count is planned from timed windows, the schedule keeps its shape."""

from __future__ import annotations

import itertools
import json
import time

import lightning as L
import pytest
import torch

from sdvae.config import config_from_dict
from sdvae.training.module import VAEGANModule, lr_lambda
from sdvae.training.plan import (
    MIN_WINDOWS,
    TrainingPlan,
    budget_plan,
    initial_plan,
    phase_shares,
    round_down,
    run_shares,
)
from sdvae.training.run import train
from tests.test_training import caches, make  # noqa: F401 - the module-scoped photo caches

BUDGETED = {"max_steps": None, "plan_steps": 40, "val_every": 1000, "checkpoint_every": 1000, "log_every": 1}


def _cfg(**train: object):
    return config_from_dict(
        {
            "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
            "loss": {"disc_start": 800, "perceptual_start": 100},
            "data": {"train_short_side": [32, 96], "min_size": 16},
            "train": {"resolution": 32, "time_budget_s": 100.0, "plan_steps": 1000, "max_steps": None, **train},
        }
    )


def test_null_max_steps_needs_a_budget():
    from sdvae.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.max_steps: null plans the run to train.time_budget_s"):
        config_from_dict({"train": {"max_steps": None, "time_budget_s": 0}})


def test_round_down_keeps_two_significant_digits():
    assert [round_down(n) for n in (7, 99, 100, 1637, 1699, 20480)] == [7, 99, 100, 1600, 1600, 20000]


def test_budget_plan_fills_the_budget_and_scales_the_schedule():
    cfg = _cfg(val_every=100, checkpoint_every=50)
    step_s = {"pixel": 0.05, "perceptual": 0.1, "gan": 0.2}
    shares = phase_shares(cfg, 1000)
    assert shares == pytest.approx({"pixel": 0.1, "perceptual": 0.7, "gan": 0.2})
    per_window = 0.1 * 0.05 + 0.7 * 0.1 + 0.2 * 0.2
    plan = budget_plan(cfg, step_s, calibration=1.0)
    assert plan.windows == round_down(int(100.0 / per_window)) == 860
    assert (plan.disc_start, plan.perceptual_start, plan.val_every, plan.checkpoint_every) == (688, 86, 86, 43)
    half = budget_plan(cfg, step_s, calibration=2.0)  # windows twice as slow: half as many
    assert half.windows == round_down(int(50.0 / per_window)) == 430
    assert half.disc_start / half.windows == pytest.approx(plan.disc_start / plan.windows, abs=0.01)


@pytest.mark.parametrize(
    ("schedule", "disc_start", "expected"),
    [("both", 0, (100, 100)), ("both", 30, (100, 70)), ("alternate", 0, (50, 50)), ("alternate", 30, (65, 35))],
)
def test_each_lr_schedule_ends_at_zero_on_its_own_optimizers_last_step(schedule, disc_start, expected):
    plan = TrainingPlan(100, disc_start, 0, 10, 10)
    assert plan.optimizer_steps(schedule, gan_on=True) == expected
    for total in expected:
        fn = lr_lambda("cosine", 5, lambda total=total: total)
        assert fn(total - 1) == pytest.approx(0.0, abs=1e-12) and fn(total - 2) > 0


def test_a_module_runs_its_schedulers_for_the_windows_each_optimizer_steps():
    cfg = config_from_dict(
        {
            "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
            "loss": {"disc_start": 30, "perceptual_weight": 0.0},
            "train": {"resolution": 32, "max_steps": 100, "gan_schedule": "alternate", "lr_schedule": "cosine"},
        }
    )
    from sdvae.models.factory import build_autoencoder

    module = VAEGANModule(cfg, build_autoencoder(cfg.model, 32), None)
    _, (sch_g, sch_d) = module.configure_optimizers()
    for sch, steps in ((sch_g, 65), (sch_d, 35)):  # windows 0-29 G only; then G on even, D on odd windows
        for _ in range(steps - 1):
            sch.step()
        assert sch.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def short_calibration(monkeypatch):
    """Calibrate on windows 2-5 instead of 5-20, so the timed span ends before MIN_WINDOWS.

    A run whose budget runs out while its windows are still being timed has already trained
    `done` windows and plans `done + 1`; a run planned from the cache starts at 0 and plans what
    the budget fits. On a slow or busy machine a few-second test budget fits fewer than 20
    windows, so with the default span these tests would compare a clamped plan with a free one.
    """
    import sdvae.training.plan as plan_mod

    monkeypatch.setattr(plan_mod, "SKIPPED_WINDOWS", 2)
    monkeypatch.setattr(plan_mod, "TIMED_WINDOWS", 3)
    assert plan_mod.SKIPPED_WINDOWS + plan_mod.TIMED_WINDOWS < plan_mod.MIN_WINDOWS


@pytest.mark.parametrize("decoder_only", [False, True])
def test_the_encoder_side_learns_at_its_own_rate(decoder_only):
    cfg = config_from_dict(
        {
            "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
            "loss": {"perceptual_weight": 0.0},
            "train": {"resolution": 32, "max_steps": 10, "lr": 1e-3, "encoder_lr_scale": 3.0},
        }
    )
    from sdvae.models.factory import build_autoencoder

    autoencoder = build_autoencoder(cfg.model, 32)
    if decoder_only:
        autoencoder.encoder.requires_grad_(False)
        autoencoder.quant_conv.requires_grad_(False)
    module = VAEGANModule(cfg, autoencoder, None)
    (opt_g, _), _ = module.configure_optimizers()
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt_g.param_groups}
    encoder = {id(p) for p in [*autoencoder.encoder.parameters(), *autoencoder.quant_conv.parameters()]}
    trainable = {id(p) for p in autoencoder.parameters() if p.requires_grad}
    if decoder_only:  # the frozen encoder is in no group
        assert list(by_lr) == [pytest.approx(1e-3)] and set().union(*by_lr.values()) == trainable
    else:
        assert sorted(by_lr) == [pytest.approx(1e-3), pytest.approx(3e-3)]
        assert by_lr[max(by_lr)] == encoder and by_lr[min(by_lr)] == trainable - encoder


def test_a_checkpoint_from_before_the_encoder_rate_option_resumes_into_the_default_optimizer():
    """Checkpoints written before `train.encoder_lr_scale` hold one AdamW group over
    `generator_parameters()`; at the default scale the optimizer keeps that layout and loads them."""
    cfg = config_from_dict(
        {"model": {"block_out_channels": [16, 32], "norm_num_groups": 8}, "train": {"resolution": 32, "max_steps": 4}}
    )
    from sdvae.models.factory import build_autoencoder

    module = VAEGANModule(cfg, build_autoencoder(cfg.model, 32), None)
    before = torch.optim.AdamW(module.generator_parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    sum(p.float().pow(2).sum() for p in module.generator_parameters()).backward()
    before.step()
    (opt_g, _), _ = module.configure_optimizers()
    opt_g.load_state_dict(before.state_dict())
    assert len(opt_g.param_groups) == 1 and len(opt_g.state) == len(before.state) > 0


class SlowWindows(L.Callback):
    """Adds a fixed sleep to every training batch: a slower machine, on purpose."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


@pytest.mark.slow
def test_a_slowed_step_plans_fewer_windows_with_the_same_schedule_fractions(
    caches,  # noqa: F811
    tmp_path,
    monkeypatch,
    short_calibration,
):
    import sdvae.training.run as run_mod

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    real_build = run_mod.build_trainer
    plans = {}
    for sleep in (0.0, 0.15):
        monkeypatch.setattr(
            run_mod, "build_trainer", lambda cfg, logger, cbs, s=sleep: real_build(cfg, logger, [*cbs, SlowWindows(s)])
        )
        # a fresh cache file per speed: the same machine would otherwise reuse its first calibration
        monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / f"timings{sleep}.json"))
        cfg, paths = make(
            caches, tmp_path / str(sleep), loss={"disc_start": 30}, train={**BUDGETED, "time_budget_s": 8.0}
        )
        result = train(cfg, paths)
        plan = result["plan"]
        assert plan["budgeted"] and plan["final"] and result["windows"] == plan["windows"]
        assert json.loads(paths.metrics.read_text())["plan"] == plan
        plans[sleep] = plan
    fast, slow = plans[0.0], plans[0.15]
    # the calibration sees the sleep (half of it at least, whatever else the machine is doing)
    assert slow["window_s"] > fast["window_s"] + 0.075, plans
    for plan in (fast, slow):
        # each plan is the budget's worth of its measured windows (record rounded to 6 digits)
        fits = [round_down(int(8.0 / (plan["window_s"] * (1 + e)))) for e in (1e-5, -1e-5)]
        assert max(MIN_WINDOWS, fits[0]) <= plan["windows"] <= max(MIN_WINDOWS, fits[1]), plan
        assert plan["disc_start"] == round(30 * plan["windows"] / 40)
    # so the slower machine plans fewer windows, unless both are at the floor
    assert slow["windows"] < fast["windows"] or slow["windows"] == fast["windows"] == MIN_WINDOWS, plans
    # the sleep alone makes a window at least 0.15 s: the plan cannot exceed the budget's worth
    assert slow["windows"] <= 8.0 / 0.15 + 1


@pytest.mark.slow
def test_the_same_machine_plans_the_same_run_and_a_resume_keeps_it(
    caches,  # noqa: F811
    tmp_path,
    monkeypatch,
    short_calibration,
):
    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    cfg, paths = make(caches, tmp_path / "a", loss={"disc_start": 30}, train={**BUDGETED, "time_budget_s": 5.0})
    first = train(cfg, paths)
    cache = json.loads((tmp_path / "timings.json").read_text())
    (entry,) = cache.values()
    assert set(entry["step_s"]["32"]) == {"perceptual", "gan"} and entry["calibration"]["32"] > 0
    from sdvae.models.factory import build_autoencoder
    from sdvae.training.measured import cached_decision

    shown = cached_decision(cfg, build_autoencoder(cfg.model, cfg.train.resolution))  # what `sdvae info` prints
    assert shown["precision"] == "32" and shown["plan"] == first["plan"]
    resumed = train(cfg, paths)  # the finished run, again: its checkpoint's plan
    assert resumed["resumed"] and resumed["plan"] == first["plan"] and resumed["windows"] == first["windows"]
    cfg2, paths2 = make(caches, tmp_path / "b", loss={"disc_start": 30}, train={**BUDGETED, "time_budget_s": 5.0})
    # the check of a cached calibration against the run's own windows re-plans beyond 1.5x, which a
    # machine busy with other work can reach between two runs (tested on its own: test_a_cached_calibration...)
    import sdvae.training.plan as plan_mod

    monkeypatch.setattr(plan_mod, "CALIBRATION_TOLERANCE", 1e9)
    again = train(cfg2, paths2)  # a new run on this machine: planned from the cache, before any window
    assert not again["resumed"] and again["plan"] == first["plan"]


def test_a_100_window_plan_scales_the_warmup_and_the_cosine_still_decays():
    """The warm-up was the one step-valued param the plan left as written: a 100-window plan of a
    run written for 1,600 spent its first 50 windows warming up."""
    from sdvae.training.plan import scaled_plan

    cfg = _cfg(warmup_steps=50, plan_steps=1600, lr_schedule="cosine")
    plan = scaled_plan(cfg, 100)
    assert plan.warmup == 3  # 50 x 100 / 1600, rounded
    fn = lr_lambda("cosine", lambda: plan.warmup, lambda: plan.windows)
    lrs = [fn(i) for i in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[50] == pytest.approx(0.5, abs=0.03) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))  # decays from the warm-up's end
    tiny = scaled_plan(_cfg(warmup_steps=50, plan_steps=40), 12)  # scaled past the run: capped at a quarter
    assert tiny.warmup == 3
    assert scaled_plan(_cfg(warmup_steps=1, plan_steps=1600), 100).warmup == 1  # a warm-up never vanishes


def test_scale_schedule_replays_a_budgeted_plan_of_that_length_without_timing():
    """A budgeted run's window count depends on the machine (580 windows on one CPU, 270 on
    another for the same 720 s); `scale_schedule` trains a given count with the schedule that
    budgeted plan had, so seeds and variants run on other machines compare with it."""
    cfg = _cfg(val_every=100, checkpoint_every=50, warmup_steps=50)
    budgeted = budget_plan(cfg, {"pixel": 0.05, "perceptual": 0.1, "gan": 0.2}, calibration=1.0)
    replay = initial_plan(
        _cfg(val_every=100, checkpoint_every=50, warmup_steps=50, max_steps=budgeted.windows, scale_schedule=True)
    )
    fields = ("windows", "disc_start", "perceptual_start", "val_every", "checkpoint_every", "scale", "warmup")
    assert [getattr(replay, f) for f in fields] == [getattr(budgeted, f) for f in fields]
    assert (replay.budgeted, replay.final, replay.window_s) == (False, True, None)
    assert run_shares(_cfg(max_steps=budgeted.windows, scale_schedule=True)) == run_shares(cfg)
    # without it, an explicit count keeps the schedule as written (the GAN only at 800 of 860 windows)
    written = initial_plan(_cfg(max_steps=budgeted.windows, warmup_steps=50))
    assert (written.disc_start, written.perceptual_start, written.warmup) == (800, 100, 50)
    assert run_shares(_cfg(max_steps=budgeted.windows))["gan"] == pytest.approx(0.07, abs=0.01)


@pytest.mark.slow
def test_a_replayed_plan_trains_its_scaled_schedule(caches, tmp_path):  # noqa: F811
    cfg, paths = make(
        caches,
        tmp_path,
        loss={"disc_start": 30},
        train={"max_steps": 8, "plan_steps": 40, "scale_schedule": True, "precision": "32", "log_every": 1},
    )
    result = train(cfg, paths)
    plan = result["plan"]
    assert (plan["windows"], plan["disc_start"], plan["budgeted"]) == (8, 6, False)
    g, d = TrainingPlan(8, 6, 0, 1, 1).optimizer_steps(cfg.train.gan_schedule, True)
    assert (result["g_steps"], result["d_steps"]) == (g, d) and d > 0


class _Strategy:
    def broadcast(self, obj, src=0):
        return obj


class _Trainer:
    is_global_zero = True
    strategy = _Strategy()
    val_check_batch = 1


class _Module:
    def __init__(self, cfg, plan):
        self.cfg, self.plan, self.windows, self.micro, self.window_done = cfg, plan, 0, 0, True

    @property
    def phase(self):
        return "gan" if self.windows >= self.plan.disc_start else "perceptual"


def _drive(planner, module, seconds_per_window, windows, monkeypatch):
    """Run `windows` windows of `seconds_per_window` on a fake clock through the planner's hooks."""
    import sdvae.training.plan as plan_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(plan_mod.time, "perf_counter", lambda: clock["t"])
    trainer = _Trainer()
    planner.on_train_start(trainer, module)
    for _ in range(windows):
        planner.on_train_batch_start(trainer, module)
        clock["t"] += seconds_per_window
        module.windows += 1
        planner.on_train_batch_end(trainer, module)


def test_alternate_gan_windows_are_timed_as_they_run_and_the_plan_fits_the_budget(tmp_path, monkeypatch):
    """Under `alternate` a GAN window trains one network: the plan's shares count it as half a timed
    G+D step, and so must the calibration. Before, calibration added the whole step per window,
    halving the calibration and planning 2x the windows the budget holds."""
    from sdvae.training.plan import BudgetPlanner, initial_plan

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    cfg = _cfg(gan_schedule="alternate", time_budget_s=100.0)
    cfg = config_from_dict({**cfg.to_dict(), "loss": {**cfg.to_dict()["loss"], "disc_start": 0, "perceptual_start": 0}})
    step_s = {"perceptual": 0.1, "gan": 0.2}
    planner = BudgetPlanner(step_s, "key", "32", None)
    module = _Module(cfg, initial_plan(cfg))
    _drive(planner, module, 0.1, 20, monkeypatch)  # each alternate window: half the G+D step
    plan = module.plan
    assert plan.final and plan.calibration == pytest.approx(1.0)
    assert 900 <= plan.windows <= 1000  # 0.1 s windows in a 100 s budget (the old calibration planned ~2,000)


@pytest.mark.parametrize(("cached", "replanned"), [(1.2, False), (3.0, True), (0.5, True)])
def test_a_cached_calibration_is_checked_against_the_runs_own_windows(cached, replanned, tmp_path, monkeypatch):
    """A calibration taken on a busy machine was kept forever. Now the run times its own windows
    5-20 anyway; beyond CALIBRATION_TOLERANCE (1.5x) it re-plans and the cache keeps the new figure
    with when and how it was taken; within it the plan made at the start stands."""
    from sdvae.training.plan import BudgetPlanner, initial_plan
    from sdvae.training.timing_cache import read_entry

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    cfg = _cfg(time_budget_s=100.0)
    step_s = {"pixel": 0.1, "perceptual": 0.1, "gan": 0.1}
    planner = BudgetPlanner(step_s, "key", "32", cached)
    module = _Module(cfg, initial_plan(cfg))
    _drive(planner, module, 0.1, 20, monkeypatch)  # the run's own calibration: 1.0
    assert module.plan.calibration == pytest.approx(1.0 if replanned else cached)
    entry = read_entry("key")
    if replanned:
        assert planner.replanned == {"cached": cached, "measured": 1.0}
        assert entry["calibration"]["32"] == pytest.approx(1.0)
        record = entry["calibration_record"]["32"]
        assert record["replaced"] == cached and "measured_at" in record and "windows 5-20" in record["how"]
    else:
        assert planner.replanned is None and entry == {}
