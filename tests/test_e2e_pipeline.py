"""The real pipeline on tiny params: dvc repro, dvc exp, push/pull, exported model, mlflow server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY_PARAMS = {
    "model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
    "discriminator": {"ndf": 8, "n_layers": 2},
    "loss": {"disc_start": 2},
    "train": {
        "resolution": 32,
        "batch_size": 4,
        "max_steps": 6,
        "val_every": 3,
        "checkpoint_every": 2,
        "log_every": 2,
        "warmup_steps": 1,
        "val_images": 2,
        "precision": "32",  # never `auto`: its answer depends on the CPU
    },
    "eval": {"resolution": 32, "batch_size": 2, "grid_images": 2},
    "export": {"scaling_images": 8},
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _copy_worktree(dest: Path) -> None:
    """The project as it is now (tracked + untracked, not ignored), as a fresh git repo."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, photos):
    base = tmp_path_factory.mktemp("e2e")
    repo = base / "repo"
    repo.mkdir()
    _copy_worktree(repo)
    for split, arrs in (("train", photos[:3]), ("eval", photos[3:6])):
        d = base / "photos" / split
        d.mkdir(parents=True)
        for i, arr in enumerate(arrs):
            Image.fromarray(arr).save(d / f"{split}{i}.png")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    params["data"].update(
        {
            "train_source": f"folder:{base}/photos/train",
            "eval_source": f"folder:{base}/photos/eval",
            "samples_per_image": 8,
            "train_short_side": [32, 96],
            "min_size": 16,
        }
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    _run(["dvc", "remote", "add", "-d", "-f", "--local", "local", str(base / "remote")], repo, env)
    _run(["dvc", "repro"], repo, env)
    return base, repo, env


def test_repro_writes_metrics_and_a_diffusers_model(project):
    _, repo, env = project
    evals = json.loads((repo / "metrics/eval.json").read_text())
    headline = {"psnr", "psnr_std", "ssim_gaussian", "ssim_uniform", "lpips", "lpips_std", "rfid", "kid"}
    for part in ("model", "baseline"):
        assert set(evals[part]) >= headline
    assert set(evals["beats_baseline"]) == {"psnr", "ssim_gaussian", "ssim_uniform", "lpips", "rfid", "kid"}
    model = evals["models"]["model"]  # the full `sdvae evaluate` result: per-image means with their counts
    assert model["psnr"]["n"] == evals["eval_images"] == 3 and model["rfid"] == {
        "value": evals["model"]["rfid"],
        "n": 3,
        "reliable": False,
    }
    assert model["latents"]["channels"] == 4 and model["sha256"] and evals["models"]["bicubic"]["latents"] is None
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == 6 and train["g_steps"] == 6 and train["d_steps"] == 4  # GAN from g_step 2
    assert (repo / "metrics/eval_grid.png").is_file() and (repo / "metrics/train_steps.csv").is_file()
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["registered_version"] == 1 and export["scaling_factor"] > 0

    import diffusers
    import torch

    vae = diffusers.AutoencoderKL.from_pretrained(repo / "models/vae").eval()
    assert abs(vae.config.scaling_factor - export["scaling_factor"]) < 1e-9
    with torch.no_grad():
        out = vae(torch.zeros(1, 3, 32, 32)).sample
    assert out.shape == (1, 3, 32, 32)
    card = (repo / "models/vae/README.md").read_text()
    assert "from_pretrained" in card and "## Evaluation\n" in card and "| train | `" in card
    # the single file beside the folder: bare LDM keys, its config in the header, the same model
    from safetensors.torch import load_file

    from sdvae.formats import load_any
    from sdvae.formats.ldm import single_file_metadata

    single = repo / "models/vae/sdvae.safetensors"
    assert export["single_file"]["path"] == "models/vae/sdvae.safetensors" and export["single_file"]["dtype"] == "fp32"
    assert "encoder.down.0.block.0.conv1.weight" in load_file(str(single)) and "AUTOMATIC1111" in card
    run_id = json.loads((repo / "models/train/run.json").read_text())["run_id"]
    assert single_file_metadata(single)["sdvae_source"]["mlflow_run_id"] == run_id
    ours, folder = load_any(single), load_any(repo / "models/vae")
    assert ours.config == folder.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), folder.state_dict().values(), strict=True))
    status = _run(["dvc", "status"], repo, env).stdout
    assert "up to date" in status  # nothing changed: repro is a no-op


def test_param_change_invalidates_only_the_stage_that_reads_it(project):
    _, repo, env = project
    assert json.loads(_run(["dvc", "status", "--json"], repo, env).stdout) == {}
    original = (repo / "params.yaml").read_text()
    for section, key, value, stage in (("eval", "grid_images", 1, "evaluate"), ("train", "lr", 0.123, "train")):
        params = yaml.safe_load(original)
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # data stages stay valid; later stages follow from the changed outputs when re-run
        assert set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout)) == {stage}
    (repo / "params.yaml").write_text(original)


def test_experiment_push_pull_and_mlflow_server(project):
    base, repo, env = project
    default_lr = float(yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["lr"])
    new_lr = default_lr / 2
    _run(["dvc", "exp", "run", "-S", f"train.lr={new_lr}"], repo, env)
    shown = json.dumps(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    assert str(new_lr) in shown
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "experiment"], repo, env)
    _run(["dvc", "push"], repo, env)

    clone = base / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], base, env)
    _run(["dvc", "remote", "add", "-d", "-f", "--local", "local", str(base / "remote")], clone, env)
    _run(["dvc", "pull", "models/vae"], clone, env)
    cfg = json.loads((clone / "models/vae/config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL"
    assert (clone / "models/vae/diffusion_pytorch_model.safetensors").stat().st_size > 1000

    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{base}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sdvae")
        with urllib.request.urlopen(req, timeout=30) as r:
            exp_id = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [exp_id], "max_results": 10}).encode()
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = json.load(r)["runs"]
        assert len(runs) == 2
        lrs = sorted(next(p["value"] for p in run["data"]["params"] if p["key"] == "train.lr") for run in runs)
        assert sorted(float(v) for v in lrs) == sorted([default_lr, new_lr])
        for run in runs:
            keys = {m["key"] for m in run["data"]["metrics"]}
            assert {"eval/lpips", "eval/rfid", "eval/kid", "eval/ssim_gaussian", "eval_baseline/lpips"} <= keys
            assert {"val/lpips", "train/total_loss"} <= keys
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _queue_idle(repo: Path, env: dict[str, str], timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _run(["dvc", "queue", "status"], repo, env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def test_queued_parallel_and_temp_experiments_land_in_the_workspace_store(project):
    """`dvc exp run --queue` / `dvc queue start -j 2` / `--temp` run in copies DVC deletes; with the
    default store (no tracking.uri, no $MLFLOW_TRACKING_URI) their runs, artifacts and model
    versions must land in the workspace's mlflow.db, matched to their `dvc exp show` rows."""
    _, repo, env = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    store = repo / "mlflow.db"
    assert not store.exists()
    _run(["dvc", "exp", "run", "--queue", "-n", "q-lr", "-S", "train.lr=0.002"], repo, env)
    q_lpips_eq = ["-S", "loss.perceptual_weight=0.5", "-S", "loss.equivariance=1.0"]  # and the EQ-VAE term
    _run(["dvc", "exp", "run", "--queue", "-n", "q-lpips", *q_lpips_eq], repo, env)
    _run(["dvc", "queue", "start", "-j", "2"], repo, env)
    status = _queue_idle(repo, env)
    if status.count("Success") != 2:
        logs = [
            subprocess.run(["dvc", "queue", "logs", n], cwd=repo, env=env, capture_output=True, text=True)
            for n in ("q-lr", "q-lpips")
        ]
        pytest.fail(status + "\n".join(p.stdout[-6000:] + p.stderr[-2000:] for p in logs))
    _run(["dvc", "exp", "run", "--temp", "-n", "t-ema", "-S", "train.ema_decay=0.95"], repo, env)
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("sdvae")
    assert experiment.artifact_location == str(repo / "mlruns")  # not a deleted copy's
    runs = {r.data.tags.get("dvc.exp_name"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"q-lr", "q-lpips", "t-ema"}
    baseline = _run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    dvc_psnr = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                name = rev.get("name")
                if name in runs:
                    dvc_psnr[name] = rev["data"]["metrics"]["metrics/eval.json"]["data"]["model"]["psnr"]
    assert set(dvc_psnr) == set(runs)
    for name, run in runs.items():
        assert run.data.tags["dvc.baseline_rev"] == baseline and run.info.run_name == name
        assert run.data.metrics["eval/psnr"] == pytest.approx(dvc_psnr[name], rel=1e-9)  # one run, two views
        assert {"eval/eval.json", "eval/eval_grid.png"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "eval")
        }
        diffusability = {"eval/latent_scale_psnr", "eval/latent_rotation_psnr", "eval/latent_hf_share", "eval/ifid"}
        assert diffusability <= set(run.data.metrics) and "eval_baseline/latent_rotation_psnr" in run.data.metrics
        assert run.data.params["loss.equivariance"] == ("1.0" if name == "q-lpips" else "0.0")
    assert runs["q-lpips"].data.metrics["train/eq_steps"] == 6  # every generator step of 6 carried the term
    assert "train/eq_steps" not in runs["q-lr"].data.metrics
    versions = client.search_model_versions("name='sdvae'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())


def test_a_sixteen_channel_model_and_its_decoder_only_fine_tune_through_the_pipeline(project):
    """FLUX-like (16 latent channels, no quant convs, a shift) through train, evaluate, export and
    diffusers; then a decoder-only fine-tune of that export, which ships the factors it started from."""
    import diffusers
    import torch

    base, repo, env = project
    original = (repo / "params.yaml").read_text()
    flux_like = ["model.latent_channels=16", "model.use_quant_conv=false", "model.use_post_quant_conv=false"]
    flux_like = [arg for s in [*flux_like, "model.shift_factor=0.5"] for arg in ("-S", s)]
    try:
        _run(["dvc", "exp", "run", "-n", "c16", *flux_like], repo, env)
        export = json.loads((repo / "metrics/export.json").read_text())
        stats = export["latent_stats"]
        assert export["factors_before"]["shift_factor"] == 0.5  # the preset's, replaced by the measured ones
        assert export["shift_factor"] == pytest.approx(stats["mean"]) and export["shift_factor"] != 0.5
        assert export["scaling_factor"] == pytest.approx(1 / stats["std"])
        assert export["fp16_decode"]["overflows_fp16"] is False
        evals = json.loads((repo / "metrics/eval.json").read_text())
        assert evals["models"]["model"]["latents"]["channels"] == 16
        assert evals["protocol"]["bicubic_values_of"] == "f2c16 latent"  # the baseline keeps as many values
        vae = diffusers.AutoencoderKL.from_pretrained(repo / "models/vae")
        layout = (vae.config.latent_channels, vae.config.use_quant_conv, vae.config.use_post_quant_conv)
        assert layout == (16, False, False)
        assert vae.config.shift_factor == pytest.approx(export["shift_factor"])
        assert (
            "replacing the preset tiny's scaling_factor 0.18215, shift_factor 0.5"
            in (repo / "models/vae/README.md").read_text()
        )

        # the path of BFL's ae.safetensors: one LDM-layout file with bare keys and no factors of its
        # own; the family (here FLUX's factors on the tiny stand-in) supplies them
        from sdvae.formats import load_any
        from sdvae.formats.ldm import save_ldm

        init = save_ldm(load_any(repo / "models/vae"), base / "c16-ae.safetensors")
        from safetensors.torch import load_file, save_file

        # as a file from elsewhere: no factors in its header (only the tiny stand-in's group count,
        # which shapes cannot tell and which every real SD-family file has at 32)
        save_file(load_file(init), init, metadata={"format": "pt", "sdvae_config": json.dumps({"norm_num_groups": 8})})
        family = ["-S", "model.scaling_factor=0.3611", "-S", "model.shift_factor=0.1159"]
        tune = ["-S", f"train.init_from={init}", "-S", "train.decoder_only=true"]
        _run(["dvc", "exp", "run", "-n", "c16-decoder", *flux_like, *family, *tune], repo, env)
        tuned = json.loads((repo / "metrics/export.json").read_text())
        assert (tuned["scaling_factor"], tuned["shift_factor"]) == (0.3611, 0.1159)
        assert "decoder-only" in tuned["scaling_factor_source"]
        theirs = diffusers.AutoencoderKL.from_pretrained(repo / "models/vae").config
        assert (theirs.scaling_factor, theirs.shift_factor, theirs.latent_channels) == (0.3611, 0.1159, 16)
        assert theirs.force_upcast == vae.config.force_upcast
        start = load_any(init).state_dict()
        after = load_any(repo / "models/vae").state_dict()
        frozen = [k for k in start if k.startswith("encoder.")]
        assert frozen and all(torch.equal(start[k], after[k]) for k in frozen)
        assert not all(torch.equal(start[k], after[k]) for k in start if k.startswith("decoder."))
        assert f"unchanged from the model training started from ({init})" in (repo / "models/vae/README.md").read_text()
    finally:
        (repo / "params.yaml").write_text(original)


def test_a_killed_auto_precision_run_resumes_with_its_own_decisions_after_the_timing_changed(project):
    """`train.precision: auto` times both precisions on this machine and decides; the stage is
    killed with SIGKILL mid-run; then the timing cache is deleted and oneDNN is capped at AVX2
    (another machine identity, where bf16 is emulated and a new timing would pick fp32). `dvc
    repro` resumes from the checkpoint in the precision the run decided, times nothing (the cache
    is not written again) and sets nothing aside. Before, the resolved precision was in the run's
    fingerprint: a flipped timing made the run stale and its checkpoints were removed."""
    import signal

    windows = 40
    base, repo, env = project
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    # killed at its first checkpoint (window 2-4): the resume runs the rest in the decided
    # precision, which under the AVX2 cap is emulated bf16 on a bf16 CPU, so the run is kept short
    params["train"].update({"precision": "auto", "max_steps": windows, "checkpoint_every": 2, "val_every": 1000})
    cache = base / "timings.json"
    env = {**env, "SDVAE_TIMING_CACHE": str(cache)}
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stale = repo / "checkpoints" / "stale"  # earlier experiments' runs, set aside when their params changed
        earlier = sorted(p.name for p in stale.iterdir()) if stale.is_dir() else []
        proc = subprocess.Popen(
            ["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        record, ckpt = repo / "checkpoints" / "run.json", repo / "checkpoints" / "last.ckpt.sha256.json"
        before = record.read_text()  # the fixture's run

        def new_checkpoint() -> bool:  # the new run recorded itself, then wrote a checkpoint
            try:  # between setting the old run aside and recording the new one there is no record
                if record.read_text() == before:
                    return False
            except FileNotFoundError:
                return False
            return ckpt.exists() and ckpt.stat().st_mtime > record.stat().st_mtime

        deadline = time.monotonic() + 600
        while not new_checkpoint() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        decided = json.loads((repo / "checkpoints" / "run.json").read_text())["precision"]
        assert decided in ("32", "bf16-mixed") and cache.is_file()
        aside = sorted(p.name for p in stale.iterdir())
        assert len(aside) == len(earlier) + 1  # the new params set the previous run aside, once
        cache.unlink()
        _run(["dvc", "repro", "train"], repo, {**env, "ONEDNN_MAX_CPU_ISA": "AVX2"})
        run = json.loads((repo / "models/train/run.json").read_text())
        assert run["resumed"] and run["precision"] == decided and run["windows"] == windows
        assert "precision_timing" not in run and not cache.exists()  # nothing was timed
        assert sorted(p.name for p in stale.iterdir()) == aside  # the resume set nothing aside
    finally:
        (repo / "params.yaml").write_text(original)
