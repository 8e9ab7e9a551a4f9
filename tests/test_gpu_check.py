"""bench/gpu/gpu_check.py: the prepared GPU check runs every phase in miniature on CPU, keeps what
finished when a phase overruns its cap, and only a real GPU run may become the gpu bench rows."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench" / g) for g in ("gpu", "speed", "quality", "common")]


@pytest.mark.slow
def test_smoke_run_on_cpu_completes_every_phase_with_measured_figures(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, "bench/gpu/gpu_check.py", "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    result = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phases = result["phases"]
    assert [p["status"] for p in phases.values()] == ["ok"] * 5
    assert phases["environment"]["matmul"]["measured_tflops"] > 0
    correctness = phases["correctness"]
    assert correctness["passed"] is True
    assert correctness["one_backward_vs_two_pass_fp32"]["tensors_compared"] > 10
    assert correctness["one_backward_vs_two_pass_fp32"]["max_relative_error"] < 1e-3
    step = phases["step"]["batch_2"]
    assert step["diffusers_images_per_s"] > 0 and step["ours_one_backward_images_per_s"] > 0
    assert phases["step"]["flops_per_image"]["ours_one_backward"] > 0
    trainer = phases["trainer"]
    assert trainer["steps"]["windows"] == trainer["config"]["planned_steps"] == 6
    assert trainer["steps"]["d_steps"] == 6 - trainer["config"]["disc_start"]
    assert 0 <= trainer["after_gan"]["loader_wait_fraction"] < 1
    models = phases["evaluation"]["models"]
    assert set(models) == {"trained", "trained_ema", "bicubic"}
    assert all(m["psnr"] > 5 and 0 < m["lpips"] < 1 for m in models.values())
    assert (out / "eval_grid.png").stat().st_size > 1000
    assert "== evaluation: ok" in (out / "gpu_check.log").read_text()


def test_a_phase_over_its_cap_is_stopped_and_what_it_recorded_stays(tmp_path, monkeypatch):
    import gpu_check
    import gpu_phases

    def fast(ctx, record, deadline):
        record("value", 1)

    def stuck(ctx, record, deadline):
        record("before", "kept")
        time.sleep(60)
        record("after", "never")

    for name in ("environment", "correctness", "trainer", "evaluation"):
        monkeypatch.setattr(gpu_phases, name, fast)
    monkeypatch.setattr(gpu_phases, "step", stuck)
    args = argparse.Namespace(device="cpu", smoke=True, bundle=str(tmp_path), budget_s=20.0, phases=None)
    t = time.perf_counter()
    result = gpu_check.run_phases(args, tmp_path)
    assert time.perf_counter() - t < 20  # step's cap is 30% of 20 s
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())["phases"]
    assert on_disk["step"]["status"] == "timeout" and on_disk["step"]["before"] == "kept"
    assert "after" not in on_disk["step"]
    assert on_disk["trainer"] == result["phases"]["trainer"]
    assert [p["status"] for n, p in on_disk.items() if n != "step"] == ["ok"] * 4


def test_only_a_full_gpu_run_is_merged_into_the_bench_rows(tmp_path):
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"smoke": True, "device": "cpu", "phases": {}}))
    bench = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/gpu/gpu_check.py", "--merge", str(smoke), "--bench-json", str(bench)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "only a full GPU run" in proc.stderr
    assert not bench.exists()
    full = tmp_path / "full.json"
    phases = {"environment": {"machine": {"device_name": "NVIDIA H200"}, "matmul": {"measured_tflops": 700.0}}}
    full.write_text(json.dumps({"smoke": False, "device": "cuda", "phases": phases}))
    bench.write_text(json.dumps({"cpu": {"kept": 1}}))
    cmd[3] = str(full)
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = json.loads(bench.read_text())
    assert rows["cpu"] == {"kept": 1}
    assert rows["gpu"]["machine"]["device_name"] == "NVIDIA H200"
    assert rows["gpu"]["matmul"]["measured_tflops"] == 700.0


def test_a_phase_run_alone_gets_the_whole_budget(tmp_path, monkeypatch):
    """`--phases correctness` once capped correctness at its 15% share of the budget (32 s of
    215 on an H200, stopped inside a compile): a subset now shares the whole budget."""
    import gpu_check
    import gpu_phases

    monkeypatch.setattr(gpu_phases, "environment", lambda ctx, record, deadline: None)
    monkeypatch.setattr(gpu_phases, "correctness", lambda ctx, record, deadline: None)
    args = argparse.Namespace(device="cpu", smoke=True, bundle=str(tmp_path), budget_s=200.0, phases="correctness")
    phases = gpu_check.run_phases(args, tmp_path)["phases"]
    shares = dict(gpu_check.PHASES)
    expected = int(200 * shares["correctness"] / (shares["correctness"] + shares["environment"]))
    assert phases["correctness"]["cap_s"] == expected > 150
    assert set(phases) == {"environment", "correctness"}


def test_merge_takes_each_phase_from_the_call_where_it_finished(tmp_path):
    first = {
        "smoke": False,
        "device": "cuda",
        "command": "first",
        "phases": {
            "environment": {"status": "ok", "machine": {"device_name": "NVIDIA H200"}},
            "step": {"status": "timeout", "partial": 1},
            "trainer": {"status": "ok", "images_per_s": 90.0},
        },
    }
    second = {
        "smoke": False,
        "device": "cuda",
        "command": "second --phases step",
        "phases": {"environment": {"status": "ok"}, "step": {"status": "ok", "full": 2}},
    }
    files = []
    for i, result in enumerate((first, second)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(result))
    bench = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/gpu/gpu_check.py", "--merge", *map(str, files), "--bench-json", str(bench)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = json.loads(bench.read_text())["gpu"]
    assert rows["step"]["full"] == 2 and "partial" not in rows["step"]
    assert rows["step"]["command"] == "second --phases step"
    assert rows["trainer"]["images_per_s"] == 90.0 and rows["trainer"]["command"] == "first"
