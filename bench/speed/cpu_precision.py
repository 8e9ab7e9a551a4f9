"""bf16 autocast against fp32 for the CPU training step, with and without native bf16 hardware.

Why `train.precision: auto` picks bf16 only on CPUs with AVX512-BF16 or AMX: the same step (tiny
preset, 64 px, batch 8, GAN on, our one-backward step) is timed in fp32 and in bf16 autocast,
interleaved, in a fresh process per instruction-set cap. `ONEDNN_MAX_CPU_ISA` and
`ATEN_CPU_CAPABILITY` stand in for CPUs without the bf16 instructions (oneDNN then emulates
bf16), so one machine answers for three kinds. Results: the `cpu_precision` entry of
metrics/bench.json.

    python bench/speed/cpu_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (name, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); None = as the machine is
ISA_CAPS = (
    ("native", None, None),
    ("avx512_without_bf16", "AVX512_CORE", "avx512"),
    ("avx2", "AVX2", "avx2"),
)


def child(repeats: int) -> dict:
    import torch

    from sdvae.metrics import build_lpips
    from train_step import build_variants, time_variants

    torch.manual_seed(0)
    batch = torch.rand(8, 3, 64, 64) * 2 - 1
    lpips_net = build_lpips()
    steps = {
        "fp32": build_variants("tiny", lpips_net, batch, ("ours_one_backward",), True, None)["ours_one_backward"],
        "bf16": build_variants("tiny", lpips_net, batch, ("ours_one_backward",), True, torch.bfloat16)[
            "ours_one_backward"
        ],
    }
    timings = time_variants(steps, torch.device("cpu"), repeats)
    return {
        "fp32_images_per_s": 8 / timings["fp32"]["seconds_per_step"],
        "bf16_images_per_s": 8 / timings["bf16"]["seconds_per_step"],
        "ratio_bf16_over_fp32": timings["fp32"]["seconds_per_step"] / timings["bf16"]["seconds_per_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    if args.child:
        print(json.dumps(child(repeats)))
        return
    from run import machine
    from sdvae.training.precision import BF16_MARGIN, cpu_flags

    flags = cpu_flags()
    rows: dict = {
        "machine": machine(),
        "command": "python bench/speed/cpu_precision.py",
        "step": "tiny preset, 64 px, batch 8, GAN on, one-backward step; median of interleaved repeats",
        "repeats": repeats,
        "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f),
        "auto_rule": f"bf16 when its timed window is at least {BF16_MARGIN}x faster than fp32's, else fp32",
    }
    for name, onednn_isa, aten_cap in ISA_CAPS:
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
        env.update({"ONEDNN_MAX_CPU_ISA": onednn_isa, "ATEN_CPU_CAPABILITY": aten_cap} if onednn_isa else {})
        cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[name]["auto_picks"] = "bf16-mixed" if rows[name]["ratio_bf16_over_fp32"] >= BF16_MARGIN else "32"
        print(name, rows[name], flush=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["cpu_precision"] = rows
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
