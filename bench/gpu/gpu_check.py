"""One call on a lent GPU measures everything: environment, correctness, step speed, the real
trainer, and the trained model against bicubic. Prepared on CPU, so the loan goes to measuring.

Phases run in order, each under its own time cap (a share of `--budget-s`); the JSON is
rewritten after every phase and sub-result, so a run killed from outside still leaves what
finished in `DIR/gpu_check.json` (log in `DIR/gpu_check.log`, eval grid in `DIR/eval_grid.png`):
  1. environment: device, versions, measured bf16 matmul TFLOP/s beside the spec-sheet peak;
  2. correctness: gradients of one backward vs the two-pass adaptive weight, and of
     `train.compile`, against fp32 eager (bench/gpu/gpu_correctness.py states the tolerances);
  3. step: bench/speed/train_step.py's variants (ours eager / compiled vs diffusers eager / compiled),
     MFU from counted FLOPs, peak memory with and without checkpointing, the largest batch
     with checkpointing within 8 GiB;
  4. trainer: `prepare` on the bundled photos, then the Lightning trainer for a fixed time
     (bf16, compile, EMA, the GAN for the last 40%): images/s, MFU, loader-wait fraction;
  5. evaluation: that model against bicubic with the project's per-image protocol.

On the GPU machine (after bench/gpu/gpu_wheels.sh here; see docs/gpu-check.md):
    bash bench/gpu/gpu_install.sh   # the wheels into /tmp/site (keeps a huggingface_hub the machine has)
    PYTHONPATH=/tmp/site:src python bench/gpu/gpu_check.py --out "$OUT"
Back here: `python bench/gpu/gpu_check.py --merge DIR/gpu_check.json` writes the `gpu` rows of
metrics/bench.json. On CPU, in CI: `python bench/gpu/gpu_check.py --smoke --device cpu --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), *(str(ROOT / "bench" / group) for group in ("gpu", "speed", "common"))]

from results import store_entry

PHASES: tuple[tuple[str, float], ...] = (  # name, share of the budget
    ("environment", 0.03),
    ("correctness", 0.15),
    ("step", 0.30),
    ("trainer", 0.42),
    ("evaluation", 0.10),
)


class PhaseTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise PhaseTimeout


class Report:
    """gpu_check.json, rewritten atomically whenever anything is added."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {**meta, "phases": {}}
        self.write()

    def phase(self, name: str) -> Callable[[str, Any], None]:
        entry = self.data["phases"].setdefault(name, {"status": "running"})

        def record(key: str, value: Any) -> None:
            entry[key] = value
            self.write()

        return record

    def finish(self, name: str, status: str, seconds: float, error: str | None = None) -> None:
        entry = self.data["phases"][name]
        entry.update(status=status, seconds=round(seconds, 1))
        if error:
            entry["error"] = error
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def run_phases(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    import gpu_phases

    device = torch.device(args.device)
    ctx = gpu_phases.Context(device=device, smoke=args.smoke, bundle=Path(args.bundle), out=out)
    report = Report(
        out,
        {"command": " ".join(sys.argv), "smoke": args.smoke, "device": str(device), "budget_s": args.budget_s},
    )
    signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    wanted = set(args.phases.split(",")) if args.phases else {n for n, _ in PHASES}
    wanted.add("environment")  # every run records its machine
    # a subset shares the whole budget: a phase run alone gets all of it, not its share of five
    total_share = sum(share for name, share in PHASES if name in wanted)
    for name, share in PHASES:
        if name not in wanted:
            continue
        cap = max(5, int(args.budget_s * share / total_share))
        left = args.budget_s - (time.perf_counter() - start)
        if left < 5:
            report.phase(name)
            report.finish(name, "skipped", 0.0, "no budget left")
            continue
        record = report.phase(name)
        record("cap_s", cap)
        t = time.perf_counter()
        signal.alarm(int(min(cap, left)))
        status, error = "ok", None
        try:
            getattr(gpu_phases, name)(ctx, record, deadline=t + min(cap, left))
        except PhaseTimeout:
            status, error = "timeout", f"stopped at its cap of {cap} s; what it recorded before stays"
        except Exception as exc:  # a failed phase is a finding; the next phases still run
            status, error = "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            if "PhaseTimeout" in f"{exc!r} {exc.__cause__!r}":  # raised inside torch.compile, wrapped
                status, error = "timeout", f"stopped at its cap of {cap} s inside {type(exc).__name__}"
        finally:
            signal.alarm(0)
        report.finish(name, status, time.perf_counter() - t, error)
        print(f"== {name}: {status} in {time.perf_counter() - t:.1f} s", flush=True)
    report.data["seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    return report.data


def combined(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several calls' results as one: each phase from the last call where it finished `ok`, else
    from the last call that ran it (a second call with `--phases` completes a first)."""
    phases: dict[str, Any] = {}
    for result in results:
        for name, phase in result["phases"].items():
            if phase.get("status") == "ok" or phases.get(name, {}).get("status") != "ok":
                phases[name] = {**phase, "command": result.get("command")}
    return {**results[-1], "phases": phases}


def bench_rows(result: dict[str, Any]) -> dict[str, Any]:
    """The `gpu` rows of metrics/bench.json: measured figures only, with the device's name."""
    phases = result["phases"]
    env = phases.get("environment", {})
    rows: dict[str, Any] = {
        "machine": env.get("machine"),
        "command": "bench/gpu/gpu_check.py (docs/gpu-check.md)",
        "matmul": env.get("matmul"),
    }
    for name in ("correctness", "step", "trainer", "evaluation"):
        rows[name] = {k: v for k, v in phases.get(name, {}).items() if k != "cap_s"}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json, the log and the grid")
    parser.add_argument("--budget-s", type=float, help="seconds for all phases (default 480; 1800 with --smoke)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="every phase in miniature (tiny preset, few steps)")
    parser.add_argument("--bundle", default=str(ROOT / ".gpu"), help="bench/gpu/gpu_wheels.sh's folder")
    parser.add_argument("--phases", help="comma-separated subset, e.g. step,trainer (a second call)")
    parser.add_argument("--write-bench", action="store_true", help="also write the gpu rows of metrics/bench.json")
    parser.add_argument(
        "--merge", nargs="+", help="write the gpu rows of metrics/bench.json from one or more calls' gpu_check.json"
    )
    parser.add_argument("--bench-json", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    if args.merge:
        results = [json.loads(Path(f).read_text()) for f in args.merge]
        for f, result in zip(args.merge, results, strict=True):
            if result.get("smoke") or not str(result.get("device", "")).startswith("cuda"):
                sys.exit(f"{f}: a smoke or CPU run; only a full GPU run goes into the gpu rows")
        store_entry(args.bench_json, "gpu", bench_rows(combined(results)))
        return
    if not args.out:
        parser.error("--out is required (or --merge)")
    if args.budget_s is None:  # caps only stop a hang: a cold CPU compile once overran 135 s on a 2-core Xeon
        args.budget_s = 1800.0 if args.smoke else 480.0
    import torch

    import gpu_phases

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; for the CPU smoke run use --smoke --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with gpu_phases.tee(out / "gpu_check.log"):
        result = run_phases(args, out)
    failed = [n for n, p in result["phases"].items() if p["status"] != "ok"]
    print(f"gpu_check: {len(result['phases']) - len(failed)} of {len(result['phases'])} phases ok; {out}")
    if args.write_bench and not args.smoke:
        store_entry(args.bench_json, "gpu", bench_rows(result))
    if failed:
        sys.exit(f"phases not ok: {', '.join(failed)} (see {out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
