"""VAE-GAN training on the tiny preset at 32 px, on real photos, through the real Lightning Trainer."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdvae.config import Config, config_from_dict
from sdvae.data.prepare import PrepareSpec, prepare_split
from sdvae.training.equivariance import EquivarianceSchedule
from sdvae.training.module import NonFiniteTrainingError
from sdvae.training.run import TrainPaths, train
from tests.cpu_kinds import needs_inductor_vector_isa

pytestmark = pytest.mark.slow

TINY = {
    "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
    "discriminator": {"ndf": 8, "n_layers": 2},
    "loss": {"disc_start": 1000},
    "data": {"train_short_side": [32, 96], "min_size": 16},
    "train": {
        "resolution": 32,
        "batch_size": 4,
        "max_steps": 8,
        "val_every": 1000,
        "checkpoint_every": 1000,
        "log_every": 1,
        "warmup_steps": 0,
        "val_images": 4,
        "lr": 1e-3,
        "ema_decay": 0.9,
        "precision": "32",  # never `auto`: its answer depends on the CPU (tests of `auto` set it themselves)
    },
    "eval": {"resolution": 32, "grid_images": 2},
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("caches")
    raw = root / "raw" / "images"
    raw.mkdir(parents=True)
    for i, arr in enumerate(photos):
        Image.fromarray(arr).save(raw / f"p{i}.png")
    prepare_split(
        root / "raw", root / "train", PrepareSpec("train", 32, 16, 10**8, max_short_side=96, samples_per_image=4)
    )
    prepare_split(root / "raw", root / "eval", PrepareSpec("eval", 32, 16, 10**8))
    return root


def log_sample_ids(path: Path) -> None:
    """Append the id (`file#copy`) of every training sample read in this process to `path`."""
    import sdvae.data.datamodule as dm

    log = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime
    real_get = dm.TrainImages.__getitem__

    def logged(self, index):
        self.return_ids = True
        img, sample_id = real_get(self, index)
        log.write(sample_id + "\n")
        return img

    dm.TrainImages.__getitem__ = logged


def make(caches: Path, tmp: Path, **overrides: dict) -> tuple[Config, TrainPaths]:
    params: dict = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    params["tracking"] = {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "test"}
    return config_from_dict(params), TrainPaths.under(tmp, caches)


def _rows(paths: TrainPaths) -> list[dict[str, str]]:
    with open(paths.train_csv) as fh:
        return list(csv.DictReader(fh))


def test_loss_decreases_on_real_photos(caches, tmp_path):
    cfg, paths = make(caches, tmp_path, train={"max_steps": 40, "log_every": 1})
    result = train(cfg, paths)
    assert result["windows"] == 40
    rec = [float(r["rec_loss"]) for r in _rows(paths)]
    assert sum(rec[-8:]) / 8 < 0.8 * sum(rec[:8]) / 8, rec


def test_disc_and_lpips_start_exactly_on_time_and_mlflow_contents(caches, tmp_path):
    loss = {"disc_start": 5, "perceptual_start": 3}
    cfg, paths = make(caches, tmp_path, loss=loss, train={"max_steps": 9, "val_every": 9})
    result = train(cfg, paths)
    rows = _rows(paths)
    assert [float(r["p_loss"]) > 0 for r in rows] == [False] * 3 + [True] * 6  # pixel loss alone, then LPIPS
    assert [r["disc_loss"] != "" for r in rows] == [False] * 5 + [True] * 4
    assert [r["d_weight"] != "" for r in rows] == [False] * 5 + [True] * 4
    assert result["g_steps"] == 9 and result["d_steps"] == 4
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.params["loss.disc_start"] == "5"
    assert {"train/total_loss", "train/logits_real", "train/d_weight", "val/lpips", "val/psnr"} <= set(run.data.metrics)
    artifacts = [a.path for a in mlflow.MlflowClient(result["tracking_uri"]).list_artifacts(run.info.run_id, "grids")]
    assert artifacts and artifacts[0].endswith(".png")
    # MLflow 3's UI opens the experiment as model training (runs and charts), not in its GenAI view
    experiment = mlflow.MlflowClient(result["tracking_uri"]).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_alternate_schedule_trains_d_on_odd_windows(caches, tmp_path):
    cfg, paths = make(caches, tmp_path, loss={"disc_start": 2}, train={"max_steps": 8, "gan_schedule": "alternate"})
    result = train(cfg, paths)
    # windows 0,1: G (before disc_start); then G on even windows 2,4,6 and D on 3,5,7
    assert (result["g_steps"], result["d_steps"]) == (5, 3)


def _grads_of_first_step(caches, tmp_path, monkeypatch, **train_overrides) -> list[torch.Tensor]:
    from sdvae.models.autoencoder_kl import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    captured: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        if not captured:
            captured.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg, paths = make(caches, tmp_path, train={"max_steps": 1, "grad_clip": 0.0, "ema": False, **train_overrides})
    torch.manual_seed(0)
    train(cfg, paths)
    return captured[0]


@pytest.mark.cpu_paths
def test_accumulation_equals_large_batch(caches, tmp_path, monkeypatch):
    import numpy as np
    from torch.utils.data import DataLoader, Subset

    import sdvae.data.datamodule as dm
    from sdvae.data.encoding import decode
    from sdvae.data.images import center_crop, resize_short_side

    def fixed_crop(self, index):  # no random crops or flips: both runs must see the same pixels
        arr = decode(dm.StreamingDataset.__getitem__(self, index)["image"])
        return torch.from_numpy(np.ascontiguousarray(center_crop(resize_short_side(arr, 32), 32))).permute(2, 0, 1)

    monkeypatch.setattr(dm.TrainImages, "__getitem__", fixed_crop)
    monkeypatch.setattr(
        dm.ImageDataModule,
        "train_dataloader",
        lambda self: DataLoader(Subset(self.train_set, range(8)), batch_size=self.batch_size, drop_last=True),
    )
    big = _grads_of_first_step(caches, tmp_path / "a", monkeypatch, batch_size=4, accumulate_grad_batches=1)
    small = _grads_of_first_step(caches, tmp_path / "b", monkeypatch, batch_size=2, accumulate_grad_batches=2)
    for a, b in zip(big, small, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * a.abs().max().item() + 1e-9)


def test_auto_precision_follows_the_timed_step_and_records_it(caches, tmp_path, monkeypatch):
    """`auto` takes what the timed step says (planted here: bf16 2x faster on this CPU, 0.7x on
    another) and records both timings; new runs on the same machine read the cache, on another
    they time afresh (resumes: tests/test_run_decisions.py)."""
    import mlflow

    from sdvae.training import measured, timing_cache

    monkeypatch.setenv("SDVAE_TIMING_CACHE", str(tmp_path / "timings.json"))
    speedup = {"value": 2.0}
    timed: list[list[str]] = []

    def planted(cfg, autoencoder, perceptual, precisions, device, rounds=3):
        timed.append(list(precisions))
        return {
            p: {"perceptual": 0.2, "gan": 0.3}
            if p == "32"
            else {"perceptual": 0.2 / speedup["value"], "gan": 0.3 / speedup["value"]}
            for p in precisions
        }

    monkeypatch.setattr(measured, "measure", planted)
    train_params = {"max_steps": 4, "checkpoint_every": 2, "precision": "auto", "accelerator": "cpu"}
    cfg, paths = make(caches, tmp_path, loss={"disc_start": 2}, train=train_params)
    result = train(cfg, paths)
    assert result["windows"] == 4 and result["skipped_steps"] == 0 and result["precision"] == "bf16-mixed"
    assert result["precision_timing"]["speedup_bf16_over_fp32"] == pytest.approx(2.0)
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.params["train.precision"] == "bf16-mixed"
    assert run.data.metrics["precision/window_s_32"] == pytest.approx(0.5 * 0.2 + 0.5 * 0.3)
    assert run.data.metrics["precision/window_s_bf16-mixed"] == pytest.approx(0.125)
    again = train(cfg, paths)  # resumed: the run's record decides, nothing is timed
    assert again["resumed"] and again["precision"] == "bf16-mixed" and len(timed) == 1
    cfg_b, paths_b = make(caches, tmp_path / "b", loss={"disc_start": 2}, train=train_params)
    other = train(cfg_b, paths_b)  # a new run on this machine: the cached timing decides
    assert other["precision_timing"]["from_cache"] and other["precision"] == "bf16-mixed" and len(timed) == 1
    real = timing_cache._cpuinfo_fields
    monkeypatch.setattr(timing_cache, "_cpuinfo_fields", lambda: {**real(), "model name": "Another CPU"})
    speedup["value"] = 0.7
    cfg_c, paths_c = make(caches, tmp_path / "c", loss={"disc_start": 2}, train=train_params)
    third = train(cfg_c, paths_c)  # a new run on another CPU: timed afresh, fp32
    assert third["precision"] == "32" and third["windows"] == 4 and len(timed) == 2


def test_nan_steps_are_skipped_and_counted(caches, tmp_path, monkeypatch):
    from sdvae.losses import VAEGANLoss

    real = VAEGANLoss.generator
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in (2, 3):
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(VAEGANLoss, "generator", poisoned)
    cfg, paths = make(caches, tmp_path, train={"max_steps": 6, "checkpoint_every": 2})
    result = train(cfg, paths)
    assert result["skipped_steps"] == 2 and result["g_steps"] == 4 and result["windows"] == 6
    from safetensors.torch import load_file

    assert all(
        torch.isfinite(t).all() for t in load_file(str(paths.out / "vae/diffusion_pytorch_model.safetensors")).values()
    )
    state = torch.load(paths.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_consecutive_nan_steps_stop_training(caches, tmp_path, monkeypatch):
    from sdvae.losses import VAEGANLoss

    real = VAEGANLoss.generator

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(VAEGANLoss, "generator", poisoned)
    cfg, paths = make(caches, tmp_path, train={"max_steps": 10, "max_bad_steps": 3})
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps"):
        train(cfg, paths)


_RUNNER = """
import json, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
from test_training import log_sample_ids, make
from sdvae.training.run import train
import sdvae.training.module as m
delay, overrides, out, ids = float(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
if ids:
    log_sample_ids(Path(ids))
if delay:
    real = m.VAEGANModule.training_step
    def slow(self, *a, **k):
        time.sleep(delay)
        return real(self, *a, **k)
    m.VAEGANModule.training_step = slow
cfg, paths = make(Path({caches!r}), out, **overrides)
print(json.dumps(train(cfg, paths)))
"""


def _runner(caches: Path, tmp_path: Path) -> Path:
    """A script that trains in its own process: argv = delay per step (s), overrides (JSON), run
    folder, file to log sample ids to ("" = none). Slow runs give a test time to kill them."""
    script = tmp_path / "runner.py"
    script.write_text(
        _RUNNER.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), caches=str(caches))
    )
    return script


def _run_args(script: Path, delay: float, overrides: dict, out: Path, ids: Path | str = "") -> list[str]:
    return [sys.executable, str(script), str(delay), json.dumps(overrides), str(out), str(ids)]


def test_resume_after_kill_reaches_same_step_count(caches, tmp_path):
    script = _runner(caches, tmp_path)
    overrides = {"train": {"max_steps": 30, "checkpoint_every": 4}, "loss": {"disc_start": 3, "equivariance": 0.5}}
    proc = subprocess.Popen(
        _run_args(script, 0.3, overrides, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["sdvae_counters"]
    assert 4 <= saved["windows"] < 30
    done = subprocess.run(_run_args(script, 0, overrides, tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resumed"] and result["windows"] == 30 and result["g_steps"] == 30 and result["d_steps"] == 27
    # the equivariance draws depend on (seed, generator step) alone: the resumed run made the same ones
    cfg, _ = make(caches, tmp_path, **overrides)
    schedule = EquivarianceSchedule(cfg.loss, cfg.train.seed, 2)
    drawn = sum(schedule.draw(g, (4, 4)) is not None for g in range(30))
    assert 5 < drawn < 25 and result["eq_steps"] == drawn
    assert "resuming from" in done.stdout


def test_changed_params_do_not_resume_stale_checkpoint(caches, tmp_path):
    cfg, paths = make(caches, tmp_path, train={"max_steps": 2, "checkpoint_every": 1})
    train(cfg, paths)
    cfg2, _ = make(caches, tmp_path, train={"max_steps": 3, "checkpoint_every": 1, "lr": 5e-4})
    result = train(cfg2, paths)
    assert not result["resumed"] and result["windows"] == 3


_DDP = """
import json, os, sys, hashlib
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
import torch
from test_training import log_sample_ids, make
from sdvae.training import run
rank = int(os.environ.get("NODE_RANK", "0")) + int(os.environ.get("LOCAL_RANK", "0"))
log_sample_ids(Path({tmp!r}, f"ids{{rank}}.log"))
layout = json.loads(sys.argv[1])
cfg, paths = make(Path({caches!r}), Path({tmp!r}), loss={{"disc_start": 2, "equivariance": 0.5}},
                  train={{"max_steps": 6, "strategy": "ddp", "accelerator": "cpu", "gan_schedule": "alternate",
                         **layout}})
captured = {{}}
real_fit = run.L.Trainer.fit
def fit(self, module, *a, **k):
    real_fit(self, module, *a, **k)
    ema = torch.cat([p.detach().flatten() for p in module.ema.parameters()])
    captured.update(rank=self.global_rank, windows=module.windows, g=module.g_steps, d=module.d_steps,
                    eq=module.eq_steps, ema=hashlib.sha256(ema.numpy().tobytes()).hexdigest())
run.L.Trainer.fit = fit
run.train(cfg, paths)
Path({tmp!r}, f"rank{{captured['rank']}}.json").write_text(json.dumps(captured))
"""


@pytest.mark.parametrize("layout", ["one_node_two_devices", "two_nodes_one_device_each"])
def test_ddp_two_cpu_processes_read_disjoint_samples(caches, tmp_path, layout):
    """DDP with gloo: Lightning launching 2 processes on one node, or 2 "nodes" of 1 process each
    started by hand with Lightning's multi-node variables (MASTER_ADDR, NODE_RANK, WORLD_SIZE),
    sharing one checkpoint folder and MLflow database as nodes share a file system. With the
    equivariance term on half the generator steps: the ranks draw alike and stay in step."""
    script = tmp_path / "ddp.py"
    script.write_text(
        _DDP.format(
            tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), caches=str(caches), tmp=str(tmp_path)
        )
    )
    port = str(29500 + os.getpid() % 1000 + (7 if layout.startswith("two") else 0))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    if layout == "one_node_two_devices":
        cmds = [([sys.executable, str(script), json.dumps({"devices": 2})], env)]
    else:
        args = [sys.executable, str(script), json.dumps({"devices": 1, "num_nodes": 2})]
        cmds = [(args, {**env, "NODE_RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) for r in (0, 1)]
    procs = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e) for c, e in cmds]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["windows"] == ranks[1]["windows"] == 6
    assert (ranks[0]["g"], ranks[0]["d"]) == (ranks[1]["g"], ranks[1]["d"]) == (4, 2)
    assert ranks[0]["ema"] == ranks[1]["ema"]
    assert ranks[0]["eq"] == ranks[1]["eq"] > 0
    # 6 photos x 4 entries = 24 samples an epoch: each rank reads its own 12, together all 24
    first_epoch = [(tmp_path / f"ids{r}.log").read_text().splitlines()[:12] for r in (0, 1)]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert len(set(first_epoch[0]) | set(first_epoch[1])) == 24


_DDP_NAN = """
import json, os, sys, hashlib
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
import torch
from test_training import make
from sdvae.losses import VAEGANLoss
from sdvae.training import run
rank = int(os.environ.get("LOCAL_RANK", "0"))
real_generator = VAEGANLoss.generator
calls = {{"n": 0}}
def poisoned(self, *a, **k):  # rank 1 only, its 4th generator step: a NaN loss and NaN gradients
    terms = real_generator(self, *a, **k)
    calls["n"] += 1
    if rank == 1 and calls["n"] == 4:
        terms.loss, terms.backward = terms.loss * float("nan"), terms.backward * float("nan")
    return terms
VAEGANLoss.generator = poisoned
cfg, paths = make(Path({caches!r}), Path({tmp!r}), loss={{"disc_start": 2}},
                  train={{"max_steps": 6, "strategy": "ddp", "accelerator": "cpu", "devices": 2}})
captured = {{}}
real_fit = run.L.Trainer.fit
def fit(self, module, *a, **k):
    real_fit(self, module, *a, **k)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()]).numpy().tobytes()
    captured.update(rank=self.global_rank, windows=module.windows, g=module.g_steps, d=module.d_steps,
                    bad=module.bad_steps, raw=hashlib.sha256(flat(module.autoencoder)).hexdigest(),
                    disc=hashlib.sha256(flat(module.discriminator)).hexdigest(),
                    ema=hashlib.sha256(flat(module.ema)).hexdigest(),
                    finite=all(bool(torch.isfinite(p).all()) for p in module.parameters()))
run.L.Trainer.fit = fit
run.train(cfg, paths)
Path({tmp!r}, f"rank{{captured['rank']}}.json").write_text(json.dumps(captured))
"""


def test_a_nan_on_one_ddp_rank_skips_the_same_window_on_every_rank(caches, tmp_path):
    """Under DDP every backward is a collective. A NaN loss on rank 1 alone must neither hang the
    run nor part the ranks: both skip the same window, count it once, and end with equal weights."""
    script = tmp_path / "ddp_nan.py"
    script.write_text(
        _DDP_NAN.format(
            tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), caches=str(caches), tmp=str(tmp_path)
        )
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000 + 13)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # window 4 skipped: 5 generator steps, discriminator steps in windows 3, 5 and 6
        assert (r["windows"], r["g"], r["d"], r["bad"], r["finite"]) == (6, 5, 3, 1, True), r
    assert ranks[0]["raw"] == ranks[1]["raw"] and ranks[0]["disc"] == ranks[1]["disc"]
    assert ranks[0]["ema"] == ranks[1]["ema"]


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_window(caches, tmp_path, monkeypatch):
    """With accumulate_grad_batches 2, a NaN in a window's first micro-batch must not leave a
    silent half-gradient step: the window is skipped and counted."""
    from sdvae.losses import VAEGANLoss

    real = VAEGANLoss.generator
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # window 2, first of its two micro-batches
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(VAEGANLoss, "generator", poisoned)
    cfg, paths = make(caches, tmp_path, train={"max_steps": 4, "accumulate_grad_batches": 2})
    result = train(cfg, paths)
    assert (result["windows"], result["g_steps"], result["skipped_steps"]) == (4, 3, 1)


def test_checkpoint_rotation_keeps_the_previous_good_one(tmp_path):
    from sdvae.training.checkpoints import checkpoint_problem, publish_checkpoint, resumable_checkpoint

    for n in (1, 2):
        tmp = tmp_path / ".last.ckpt.tmp"
        tmp.write_bytes(bytes([n]) * 1000)
        publish_checkpoint(tmp, tmp_path)
    assert (tmp_path / "last.ckpt").read_bytes()[:1] == b"\x02" and (tmp_path / "prev.ckpt").read_bytes()[:1] == b"\x01"
    assert resumable_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    data = bytearray((tmp_path / "last.ckpt").read_bytes())
    data[500] ^= 0xFF  # same size, one flipped byte
    (tmp_path / "last.ckpt").write_bytes(bytes(data))
    assert "sha256 differs" in checkpoint_problem(tmp_path / "last.ckpt")
    assert resumable_checkpoint(tmp_path) == tmp_path / "prev.ckpt"
    (tmp_path / "prev.ckpt").write_bytes(b"\x01" * 10)
    assert "truncated" in checkpoint_problem(tmp_path / "prev.ckpt")
    assert resumable_checkpoint(tmp_path) is None


def test_a_published_last_checkpoint_is_verifiable_the_moment_it_appears(tmp_path, monkeypatch):
    """A kill right after `last.ckpt` appears must not leave it unverified (the resume would restart)."""
    from sdvae.training import checkpoints

    seen: list[str | None] = []
    real_replace = os.replace

    def replace_and_check(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "last.ckpt":
            seen.append(checkpoints.checkpoint_problem(Path(dst)))

    monkeypatch.setattr(checkpoints.os, "replace", replace_and_check)
    for n in (1, 2):
        tmp = tmp_path / ".last.ckpt.tmp"
        tmp.write_bytes(bytes([n]) * 1000)
        checkpoints.publish_checkpoint(tmp, tmp_path)
    assert seen == [None, None]


def test_truncated_last_checkpoint_falls_back_to_previous(caches, tmp_path, capsys):
    cfg, paths = make(caches, tmp_path, train={"max_steps": 4, "checkpoint_every": 2})
    train(cfg, paths)
    last = paths.checkpoints / "last.ckpt"
    assert (paths.checkpoints / "prev.ckpt").is_file()
    with open(last, "r+b") as fh:  # cut it like a disk that filled up mid-write
        fh.truncate(last.stat().st_size // 2)
    capsys.readouterr()
    result = train(cfg, paths)
    err = capsys.readouterr().err
    assert f"not resuming from {last}" in err and "truncated" in err
    assert result["resumed"] and result["windows"] == 4
    for name in ("last.ckpt", "prev.ckpt"):  # both damaged: start afresh instead of failing every re-run
        (paths.checkpoints / name).write_bytes(b"PK\x03\x04 damaged")
    result = train(cfg, paths)
    assert not result["resumed"] and result["windows"] == 4


def test_progress_bar_counts_steps_and_grids_are_labelled(caches, tmp_path, capsys):
    cfg, paths = make(caches, tmp_path, train={"max_steps": 3, "val_every": 3})
    train(cfg, paths)
    err = capsys.readouterr().err
    assert re.search(r"train: 100%.*\| 3/3 \[", err) and "img/s=" in err  # windows / train.max_steps, not epochs
    grid = Image.open(paths.grids / "val_step000003.png")
    assert grid.width > 2 * 32 and grid.height > 2 * 32  # label column and caption around the 2x2 images


@needs_inductor_vector_isa
def test_compiled_training_runs_the_same_schedule_as_eager(caches, tmp_path):
    """train.compile on the CPU (inductor) with EMA, gradient checkpointing, GAN and adaptive weight,
    and the equivariance term on every step (its latents of other sizes recompile the decoder),
    through the real trainer. Only what is exact or robust is compared across a multi-window run:
    counters, finiteness, the GAN switching on at its window, the EMA moving away from the raw
    weights. Whether compiled numbers equal eager ones is checked on one step from identical
    weights (tests/test_losses.py::test_compiled_networks_give_eager_gradients): after several
    Adam steps round-off grows by construction, so a trajectory tolerance holds on no CPU kind
    by design (1.5e-3 apart at window 2 on one, against 1e-3 allowed)."""
    rows = {}
    for compiled in (False, True):
        cfg, paths = make(
            caches,
            tmp_path / str(compiled),
            model={"block_out_channels": [16, 32], "norm_num_groups": 8, "gradient_checkpointing": True},
            loss={"disc_start": 2, "equivariance": 1.0},
            train={"max_steps": 4, "compile": compiled, "grad_clip": 0.0},
        )
        result = train(cfg, paths)
        assert (result["windows"], result["g_steps"], result["d_steps"], result["skipped_steps"]) == (4, 4, 2, 0)
        rows[compiled] = _rows(paths)
        for r in rows[compiled]:
            for key in ("total_loss", "rec_loss", "p_loss", "kl_loss", "eq_loss"):
                assert torch.isfinite(torch.tensor(float(r[key]))), (compiled, r)
        # the GAN term joins at generator step 2: windows 3 and 4 carry the adaptive weight
        assert [bool(r["d_weight"]) for r in rows[compiled]] == [False, False, True, True]
        raw = load_file(paths.out / "vae" / "diffusion_pytorch_model.safetensors")
        ema = load_file(paths.out / "vae_ema" / "diffusion_pytorch_model.safetensors")
        assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    for key in ("step", "g_steps", "d_steps", "skipped_steps", "eq_steps"):
        assert [r[key] for r in rows[False]] == [r[key] for r in rows[True]], key


def test_compile_on_a_cpu_inductor_cannot_build_for_is_refused_before_any_work(caches, tmp_path, monkeypatch):
    import torch._inductor.cpu_vec_isa as isa

    from sdvae.training.compiling import CompileUnsupported

    monkeypatch.setattr(isa, "pick_vec_isa", lambda: isa.InvalidVecISA())
    cfg, paths = make(caches, tmp_path, train={"compile": True, "accelerator": "cpu"})
    with pytest.raises(CompileUnsupported, match=r"train\.compile: .*no vector instruction set.*train\.compile: false"):
        train(cfg, paths)
    assert not paths.checkpoints.exists() and not paths.out.exists()


def test_killed_run_resumes_mid_epoch_with_the_next_unseen_samples(caches, tmp_path):
    """6 photos x 4 entries = 6 batches of 4 per epoch; killed after window 4 (mid-epoch), the
    resumed run sees exactly the samples an uninterrupted run sees next: none repeated, none skipped.
    Lightning carries the loader's position in the checkpoint; `ClosesResumedEpoch` stops the
    loader replaying the rest of the interrupted epoch at the next one."""
    script, overrides = _runner(caches, tmp_path), {"train": {"max_steps": 12, "checkpoint_every": 4}}
    whole = tmp_path / "whole.log"
    done = subprocess.run(_run_args(script, 0, overrides, tmp_path / "a", whole), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    cut = tmp_path / "cut.log"
    proc = subprocess.Popen(
        _run_args(script, 0.4, overrides, tmp_path / "b", cut),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    windows = torch.load(ckpt, map_location="cpu", weights_only=True)["sdvae_counters"]["windows"]
    assert 4 <= windows < 6  # killed inside the first epoch
    trained_before = cut.read_text().splitlines()[: windows * 4]
    cut.write_text("")
    again = subprocess.run(_run_args(script, 0, overrides, tmp_path / "b", cut), capture_output=True)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    resumed = trained_before + cut.read_text().splitlines()
    uninterrupted = whole.read_text().splitlines()
    assert len(uninterrupted) == len(resumed) == 12 * 4 and len(set(uninterrupted[:24])) == 24
    assert resumed[:24] == uninterrupted[:24]  # the interrupted epoch continues exactly where it stopped
    # the next epoch is shuffled anew (not in the uninterrupted run's order): still every sample once
    assert sorted(resumed[24:]) == sorted(uninterrupted[24:])


def test_rerun_after_validation_resumes_from_the_finished_checkpoint(caches, tmp_path):
    """A checkpoint written after a validation loads into a fresh module (no validation-only keys)."""
    cfg, paths = make(caches, tmp_path, train={"max_steps": 2, "val_every": 1, "checkpoint_every": 1})
    train(cfg, paths)
    state = torch.load(paths.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("val_metrics.") for k in state)
    result = train(cfg, paths)
    assert result["resumed"] and result["windows"] == 2
    val_steps = [row["step"] for row in csv.DictReader(paths.val_csv.open())]
    assert val_steps == ["1", "2"]  # the re-run's validation of window 2 replaced the row, not repeated it


@pytest.mark.parametrize("equivariance", [0.0, 1.0])
def test_decoder_only_fine_tune_leaves_encoder_and_latents_bit_identical(caches, tmp_path, photos, equivariance):
    """From a saved model, with the GAN and EMA on (and the equivariance term, which decodes a
    second, transformed sample): every encoder and quant_conv weight, and the latents of a fixed
    image, stay bit-identical; the decoder trains."""
    from sdvae.formats.diffusers import load_diffusers, save_diffusers
    from sdvae.models import AutoencoderKL
    from tests.conftest import to_tensor

    torch.manual_seed(0)
    start = AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8)
    init = save_diffusers(start, tmp_path / "init")
    cfg, paths = make(
        caches,
        tmp_path,
        train={"init_from": str(init), "decoder_only": True, "max_steps": 4},
        loss={"disc_start": 2, "equivariance": equivariance},
    )
    result = train(cfg, paths)
    assert result["d_steps"] == 2  # the GAN ran: its gradient reached the decoder only
    assert result.get("eq_steps", 0) == (4 if equivariance else 0)
    tuned = load_diffusers(paths.out / "vae")
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert len(frozen) > 20 and all(torch.equal(before[k], after[k]) for k in frozen)
    ema = load_diffusers(paths.out / "vae_ema").state_dict()  # what export ships with eval.use_ema
    assert all(torch.equal(before[k], ema[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    x = to_tensor(photos[0], 32)
    with torch.no_grad():
        assert torch.equal(start.eval().encode(x).mode(), tuned.eval().encode(x).mode())
        assert torch.equal(start.encode(x).std, tuned.encode(x).std)


def test_semi_amortised_encoding_trains_with_its_encoder_loss_logged(caches, tmp_path):
    cfg, paths = make(caches, tmp_path, loss={"refine_steps": 2}, train={"max_steps": 6, "log_every": 1})
    result = train(cfg, paths)
    assert result["windows"] == 6
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.params["loss.refine_steps"] == "2"
    assert "train/refine_loss" in run.data.metrics and run.data.metrics["train/refine_loss"] > 0


def test_multi_size_training_feeds_each_batch_at_one_drawn_size(caches, tmp_path, monkeypatch):
    from sdvae.training.module import VAEGANModule

    seen: list[tuple[int, int]] = []
    step = VAEGANModule.training_step

    def recording(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        seen.append((batch.shape[0], batch.shape[-1]))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(VAEGANModule, "training_step", recording)
    cfg, paths = make(caches, tmp_path, train={"max_steps": 12, "crop_sizes": [32, 64]})
    assert train(cfg, paths)["windows"] == 12
    # batch_size 4 at 32 px; a 64-px batch holds the same pixels: one image
    assert set(seen) == {(4, 32), (1, 64)}, seen
