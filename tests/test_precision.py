"""`train.precision: auto` decides by timing the real step here, not by CPU flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdvae.training import timing_cache
from sdvae.training.precision import BF16_MARGIN, choose, cpu_flags, resolve_without_measuring

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


SHARES = {"perceptual": 0.8, "gan": 0.2}


@pytest.mark.parametrize(
    ("bf16_speedup", "expected"),
    [(2.16, "bf16-mixed"), (BF16_MARGIN + 0.01, "bf16-mixed"), (1.05, "32"), (1.0, "32"), (0.71, "32")],
)
def test_auto_takes_bf16_only_when_its_window_is_clearly_faster(bf16_speedup, expected):
    fp32 = {"perceptual": 0.4, "gan": 0.6}
    bf16 = {k: v / bf16_speedup for k, v in fp32.items()}
    choice = choose({"32": fp32, "bf16-mixed": bf16}, SHARES, from_cache=False)
    assert choice.precision == expected
    assert choice.as_record()["speedup_bf16_over_fp32"] == pytest.approx(bf16_speedup, rel=1e-3)


@pytest.mark.parametrize("requested", ["32", "bf16-mixed", "16-mixed"])
def test_an_explicit_precision_is_kept(requested):
    assert resolve_without_measuring(requested, "cpu") == requested
    assert resolve_without_measuring(requested, "gpu") == requested


def test_auto_keeps_fp32_on_other_accelerators_and_measures_on_a_cpu():
    assert resolve_without_measuring("auto", "mps") == "32"
    assert resolve_without_measuring("auto", "cpu") is None  # timed


def test_the_cache_key_changes_with_the_cpu_model_and_the_isa_caps(monkeypatch):
    workload = {"resolution": 64}
    here = timing_cache.cache_key(timing_cache.machine_identity(), workload)
    assert timing_cache.cache_key(timing_cache.machine_identity(), workload) == here
    assert timing_cache.cache_key(timing_cache.machine_identity(), {"resolution": 128}) != here
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert timing_cache.cache_key(timing_cache.machine_identity(), workload) != here
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    real = timing_cache._cpuinfo_fields
    other = lambda: {**real(), "model name": "Another CPU", "model": "207"}  # noqa: E731
    monkeypatch.setattr(timing_cache, "_cpuinfo_fields", other)
    assert timing_cache.cache_key(timing_cache.machine_identity(), workload) != here


PROBE = """
import json, sys
from sdvae.config import config_from_dict
from sdvae.metrics import build_lpips
from sdvae.models.factory import build_autoencoder
from sdvae.training.measured import measure_setup
cfg = config_from_dict({
    "model": {"block_out_channels": [32, 64], "norm_num_groups": 8},
    "loss": {"disc_start": 50},
    "data": {"train_short_side": [64, 96]},
    "train": {"resolution": 64, "batch_size": 4, "max_steps": 100, "precision": "auto", "accelerator": "cpu"},
})
setup = measure_setup(cfg, build_autoencoder(cfg.model, 64), build_lpips())
print(json.dumps(setup.choice.as_record()))
"""


def _probe(env_extra: dict[str, str], cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env.update(env_extra, SDVAE_TIMING_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_auto_picks_fp32_where_bf16_is_emulated_whatever_the_flags_say(tmp_path):
    """Under ONEDNN_MAX_CPU_ISA=AVX512_CORE oneDNN emulates bf16 (0.32x of fp32 on an AMX Xeon, in
    bench/speed/cpu_precision.py) while /proc/cpuinfo still lists avx512_bf16 / amx_bf16 where the CPU
    has them: a decision by flags took bf16 there. The timed one must take fp32, cache it, and
    time afresh without the cap (another key)."""
    cache = tmp_path / "timings.json"
    capped = _probe({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, cache)
    assert capped["precision"] == "32" and capped["measured"] and not capped["from_cache"], capped
    assert capped["window_s_32"] > 0 and capped["window_s_bf16-mixed"] > 0
    again = _probe({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, cache)
    assert again["from_cache"] and again == {**capped, "from_cache": True}
    native = _probe({}, cache)
    assert not native["from_cache"] and len(json.loads(cache.read_text())) == 2


def test_a_precision_hopelessly_slower_in_the_warm_up_is_not_timed_further():
    from sdvae.training.step_timing import HOPELESS_FACTOR, time_step_variants

    calls: list[tuple[str, str]] = []
    cost = {"32": 0.002, "bf16-mixed": 0.002 * (HOPELESS_FACTOR + 4), "16-mixed": 0.004}

    def step(precision: str, phase: str) -> None:
        calls.append((precision, phase))
        time.sleep(cost[precision] * (2 if phase == "gan" else 1))

    out = time_step_variants(step, [(p, ph) for p in cost for ph in ("perceptual", "gan")], torch.device("cpu"))
    # warm-up once each, then 3 rounds for the two that can win; the emulated-bf16-like one stops
    assert calls.count(("bf16-mixed", "perceptual")) == 1 and calls.count(("bf16-mixed", "gan")) == 1
    assert calls.count(("32", "gan")) == 4 and calls.count(("16-mixed", "perceptual")) == 4
    assert out["bf16-mixed"]["gan"] > HOPELESS_FACTOR * out["32"]["gan"]  # its warm-up time, still slower
    assert set(out) == set(cost) and all(set(v) == {"perceptual", "gan"} for v in out.values())
