"""A timing never costs a run: the precision and the plan belong to the run's record and
checkpoint, global rank 0 decides for every rank, and nothing a run wrote is deleted because a
timing differed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from sdvae.training import measured, timing_cache
from sdvae.training.run import run_fingerprint, train
from tests.test_training import caches, make  # noqa: F401 - the module-scoped photo caches

PHASE_S = {"pixel": 0.02, "perceptual": 0.02, "gan": 0.03}


def _planted(speedup: dict[str, float], timed: list[list[str]]):
    def measure(cfg, autoencoder, perceptual, precisions, device, rounds=3):
        timed.append(list(precisions))
        s = speedup["bf16"]
        return {p: {k: v if p == "32" else v / s for k, v in PHASE_S.items()} for p in precisions}

    return measure


def test_a_resumed_run_keeps_its_precision_and_plan_whatever_the_timing_says(caches, tmp_path, monkeypatch):  # noqa: F811
    """`auto` decided bf16 (timed 2x faster); then the cache is deleted and the CPU changes so that a
    new timing would pick fp32. The run resumes with bf16 and its plan, untimed, and its checkpoints
    stay. (Before: the resolved precision was in the fingerprint, the run counted as stale and
    rank 0 removed checkpoints/ with rmtree.) A change of params still starts afresh, with the
    old checkpoints kept aside, not deleted."""
    cache = tmp_path / "timings.json"
    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(cache))
    speedup, timed = {"bf16": 2.0}, []
    monkeypatch.setattr(measured, "measure", _planted(speedup, timed))
    train_params = {"max_steps": 4, "checkpoint_every": 2, "precision": "auto", "accelerator": "cpu"}
    cfg, paths = make(caches, tmp_path, loss={"disc_start": 2}, train=train_params)
    first = train(cfg, paths)
    assert first["precision"] == "bf16-mixed" and first["precision_timing"]["speedup_bf16_over_fp32"] == 2.0
    record = json.loads((paths.checkpoints / "run.json").read_text())
    assert record["precision"] == "bf16-mixed"

    cache.unlink()  # the timing cache is gone, and the machine now says fp32 is faster
    real = timing_cache._cpuinfo_fields
    monkeypatch.setattr(timing_cache, "_cpuinfo_fields", lambda: {**real(), "model name": "Another CPU"})
    speedup["bf16"] = 0.7
    resumed = train(cfg, paths)
    assert resumed["resumed"] and resumed["precision"] == "bf16-mixed" and resumed["windows"] == 4
    assert resumed["plan"] == first["plan"] and len(timed) == 1  # nothing timed again
    assert not (paths.checkpoints / "stale").exists()  # nothing set aside either
    last = (paths.checkpoints / "last.ckpt").read_bytes()

    cfg2, _ = make(caches, tmp_path, loss={"disc_start": 2}, train={**train_params, "seed": 1})
    fresh = train(cfg2, paths)  # other params: a new run, timed on this machine
    assert not fresh["resumed"] and fresh["precision"] == "32" and len(timed) == 2
    aside = Path(fresh["checkpoints_set_aside"])
    assert aside.parent == paths.checkpoints / "stale" and (aside / "last.ckpt").read_bytes() == last
    assert json.loads((aside / "run.json").read_text())["precision"] == "bf16-mixed"


def test_a_resume_continues_its_mlflow_run_where_the_run_is_whatever_the_store_resolves_to(caches, tmp_path, capsys):  # noqa: F811
    """A queued experiment's copy resumed with `dvc repro` resolves the default store to the copy,
    not to the workspace that holds the run; MLflow raised on the unknown run id and the resume
    failed. The run's record decides where the run is. A run no store holds any more (its
    database deleted) gets a new run in today's store; the weights resume either way."""
    train_params = {"max_steps": 2, "checkpoint_every": 1, "precision": "32", "accelerator": "cpu"}
    cfg, paths = make(caches, tmp_path, train=train_params)
    first = train(cfg, paths)
    elsewhere = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=f"sqlite:///{tmp_path}/b.db"))

    resumed = train(elsewhere, paths)
    assert resumed["resumed"] and resumed["windows"] == 2
    assert (resumed["run_id"], resumed["tracking_uri"]) == (first["run_id"], first["tracking_uri"])
    assert not resumed["default_store"] and not (tmp_path / "b.db").exists()
    assert f"continuing MLflow run {first['run_id']} in {first['tracking_uri']}" in capsys.readouterr().out
    record = json.loads((paths.checkpoints / "run.json").read_text())
    assert record["tracking_uri"] == first["tracking_uri"]  # still where the run is

    (tmp_path / "mlflow.db").unlink()
    renewed = train(elsewhere, paths)
    assert renewed["resumed"] and renewed["run_id"] != first["run_id"]
    assert renewed["tracking_uri"] == f"sqlite:///{tmp_path}/b.db"
    assert "is in no store any more" in capsys.readouterr().out
    run = mlflow.MlflowClient(renewed["tracking_uri"]).get_run(renewed["run_id"])
    assert run.data.params["train.max_steps"] == "2"  # the new run has the params


def test_the_fingerprint_holds_the_params_as_written_and_the_weights_validation_scores(caches, tmp_path):  # noqa: F811
    cfg, paths = make(caches, tmp_path, train={"precision": "auto"})
    same, _ = make(caches, tmp_path, train={"precision": "auto"})
    other_ema, _ = make(caches, tmp_path, train={"precision": "auto"}, eval={"use_ema": False})
    assert run_fingerprint(cfg, paths) == run_fingerprint(same, paths)
    assert run_fingerprint(cfg, paths) != run_fingerprint(other_ema, paths)


def test_the_train_stage_reruns_when_eval_use_ema_changes():
    """`eval.use_ema` decides which weights validation scores (and the checkpointed history)."""
    import yaml

    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    assert "eval.use_ema" in stages["train"]["params"]


_TWO_NODES = """
import json, os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
from test_training import make
from sdvae.models.factory import build_autoencoder
from sdvae.training import measured, run
from sdvae.training.timing_cache import locked_entry
rank = int(os.environ["NODE_RANK"])
os.environ["SDVAE_TIMING_CACHE"] = str(Path({tmp!r}, f"cache{{rank}}.json"))  # each node its own cache
cfg, paths = make(Path({caches!r}), Path({tmp!r}), loss={{"disc_start": 1000}},
                  train={{"max_steps": None, "time_budget_s": 0.05, "plan_steps": 40, "precision": "auto",
                         "strategy": "ddp", "accelerator": "cpu", "devices": 1, "num_nodes": 2}})
key = measured._cache_key(cfg, build_autoencoder(cfg.model, cfg.train.resolution))
phases = {{"pixel": 0.02, "perceptual": 0.02, "gan": 0.03}}
fast, slow = ({{k: v / 2 for k, v in phases.items()}}, phases)
with locked_entry(key) as entry:
    if rank == 0:  # cold for the plan; its precision timing says bf16 is 2x faster
        entry["step_s"] = {{"32": slow, "bf16-mixed": fast}}
    else:  # warm: a calibration, and a precision timing that says fp32 is faster
        entry["step_s"] = {{"32": fast, "bf16-mixed": slow}}
        entry["calibration"] = {{"32": 1.0}}
captured = {{}}
real_fit = run.L.Trainer.fit
def fit(self, module, *a, **k):
    real_fit(self, module, *a, **k)
    captured.update(rank=self.global_rank, precision=self.precision, plan=module.plan.as_record(),
                    windows=module.windows)
run.L.Trainer.fit = fit
run.train(cfg, paths)
Path({tmp!r}, f"rank{{captured['rank']}}.json").write_text(json.dumps(captured))
"""


def test_two_nodes_with_a_warm_and_a_cold_cache_take_rank_0s_precision_and_plan(caches, tmp_path):  # noqa: F811
    """2 gloo processes as 2 nodes, each with its own timing cache: rank 0's holds no calibration
    and prefers bf16, rank 1's holds a calibration and prefers fp32. Before, rank 1 broadcast its
    plan at train start while rank 0 waited for window 20 (a hang or a garbage plan), and the two
    trained in different precisions. Now both take rank 0's precision and plan."""
    script = tmp_path / "two_nodes.py"
    script.write_text(
        _TWO_NODES.format(
            tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), caches=str(caches), tmp=str(tmp_path)
        )
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + os.getpid() % 1000)}
    env.pop("SDVAE_TIMING_CACHE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "NODE_RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2"},
        )
        for r in (0, 1)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, err.decode()[-4000:]
    finally:
        for proc in procs:
            proc.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["precision"] == ranks[1]["precision"] == "bf16-mixed"
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["plan"]["final"]
    assert ranks[0]["windows"] == ranks[1]["windows"] == ranks[0]["plan"]["windows"]
    # rank 0 planned from its own windows (its cache had no calibration): the timed span's end
    assert ranks[0]["plan"]["windows"] == 21
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["precision"] == "bf16-mixed"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "devices", 2),
        ("train", "num_nodes", 2),
        ("train", "strategy", "ddp"),
        ("train", "accelerator", "mps"),
        ("loss", "equivariance", 0.5),
    ],
)
def test_every_setting_that_changes_the_step_time_has_its_own_timings(section, key, value, tmp_path, monkeypatch):
    from sdvae.config import config_from_dict
    from sdvae.models.factory import build_autoencoder

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    timed: list[list[str]] = []
    monkeypatch.setattr(measured, "measure", _planted({"bf16": 2.0}, timed))
    base = {"train": {"max_steps": None, "time_budget_s": 10.0, "precision": "32", "accelerator": "cpu"}}
    changed = json.loads(json.dumps(base))
    changed.setdefault(section, {})[key] = value
    for params in (base, base, changed):
        cfg = config_from_dict(params)
        measured.measure_setup(cfg, build_autoencoder(cfg.model, cfg.train.resolution), None)
    assert len(timed) == 2  # the repeat read the cache; the change measured afresh


def test_retiming_adds_missing_phases_without_overwriting_those_a_calibration_used(tmp_path, monkeypatch):
    from sdvae.config import config_from_dict
    from sdvae.models.factory import build_autoencoder

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    timed: list[list[str]] = []
    monkeypatch.setattr(measured, "measure", _planted({"bf16": 2.0}, timed))
    train_params = {"max_steps": None, "time_budget_s": 10.0, "precision": "32", "accelerator": "cpu"}
    cfg = config_from_dict({"loss": {"disc_factor": 0.0}, "train": train_params})
    ae = build_autoencoder(cfg.model, cfg.train.resolution)
    measured.measure_setup(cfg, ae, None)
    key = measured._cache_key(cfg, ae)
    with timing_cache.locked_entry(key) as entry:
        entry["step_s"]["32"]["perceptual"] = 0.5  # what an earlier calibration was taken against
    gan_cfg = config_from_dict({"loss": {"disc_factor": 1.0}, "train": train_params})  # same key, one phase more
    assert measured._cache_key(gan_cfg, ae) == key
    measured.measure_setup(gan_cfg, ae, None)
    step_s = timing_cache.read_entry(key)["step_s"]["32"]
    assert step_s["perceptual"] == 0.5 and step_s["gan"] == PHASE_S["gan"]
    assert "measured_at" in timing_cache.read_entry(key)["step_record"]["32"]


def test_sdvae_info_retime_forgets_this_machines_timings(tmp_path, monkeypatch):
    from sdvae.cli import main

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: null\n  time_budget_s: 10\n  precision: '32'\n  accelerator: cpu\n")
    from sdvae.config import load_config
    from sdvae.models.factory import build_autoencoder

    cfg = load_config(params)
    key = measured._cache_key(cfg, build_autoencoder(cfg.model, cfg.train.resolution))
    with timing_cache.locked_entry(key) as entry:
        entry["step_s"] = {"32": dict(PHASE_S)}
        entry["calibration"] = {"32": 1.3}
    assert main(["info", "--params", str(params), "--retime"]) == 0
    assert timing_cache.read_entry(key) == {}


def test_sdvae_info_shows_what_was_timed_for_an_init_from_run(tmp_path, monkeypatch, capsys):
    """It said "timed at the start of training" for every init_from run: now it looks up the
    loaded model's workload, as training does."""
    from sdvae.cli import main
    from sdvae.config import load_config
    from sdvae.formats.diffusers import save_diffusers
    from sdvae.models.autoencoder_kl import AutoencoderKL
    from sdvae.training.starting import starting_autoencoder

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    save_diffusers(AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8), tmp_path / "vae")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"train:\n  init_from: {tmp_path / 'vae'}\n  max_steps: null\n  time_budget_s: 10\n"
        "  precision: '32'\n  accelerator: cpu\nloss:\n  disc_factor: 0.0\n"
    )
    cfg = load_config(params)
    with timing_cache.locked_entry(measured._cache_key(cfg, starting_autoencoder(cfg))) as entry:
        entry["step_s"] = {"32": dict(PHASE_S)}
        entry["calibration"] = {"32": 1.0}
    assert main(["info", "--params", str(params)]) == 0
    shown = json.loads(capsys.readouterr().out)["measured_here"]
    assert shown["precision"] == "32" and shown["plan"]["calibration"] == 1.0
