"""Benchmarks, each a ratio against a reference measured in the same run on the same machine.

CPU rows (`cpu` in metrics/bench.json): the training step with every speed option against
diffusers.AutoencoderKL (bench/speed/train_step.py), before and after the GAN starts; encode/decode
at 256 px; shard loader vs JPEG decoding; peak memory of a training step. GPU rows (`gpu`,
`--device cuda`): the SD f8c4 step at 256 px in bf16 with each option and its MFU from counted
FLOPs. A run replaces only its own device's rows.

    python bench/run.py [--device cpu|cuda] [--quick] [--out metrics/bench.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent / group) for group in ("common", "speed")]  # bench/README.md

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from train_step import bench_train_step, build_variants, counted_flops, twin_models

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_codec(batch_size: int, res: int, repeats: int) -> dict:
    ours, theirs = twin_models("tiny")
    ours.eval()
    theirs.eval()
    x = torch.rand(batch_size, 3, res, res) * 2 - 1
    out: dict = {"batch": batch_size, "resolution": res, "preset": "tiny", "dtype": "fp32"}
    with torch.no_grad():
        z = ours.encode(x).mode()
        rows = {
            "encode": (lambda: ours.encode(x).mode(), lambda: theirs.encode(x).latent_dist.mode()),
            "decode": (lambda: ours.decode(z), lambda: theirs.decode(z).sample),
        }
        for name, (a, b) in rows.items():
            ta, tb = [], []
            for _ in range(repeats):
                ta.append(timed(a, 1, 0))
                tb.append(timed(b, 1, 0))
            ta_m, tb_m = statistics.median(ta), statistics.median(tb)
            out[f"{name}_ours_images_per_s"] = batch_size / ta_m
            out[f"{name}_diffusers_images_per_s"] = batch_size / tb_m
            out[f"{name}_ratio_ours_over_diffusers"] = tb_m / ta_m
    return out


def bench_loader(raw_dir: Path, res: int, train_images_per_s: float, tmp: Path) -> dict:
    """The train cache's loader in one process: decode + fresh random crop + flip per sample,
    against decoding and cropping the source files directly, and against the step's consumption."""
    from torch.utils.data import Subset

    from sdvae.data.datamodule import TrainImages, random_crop
    from sdvae.data.images import load_rgb
    from sdvae.data.prepare import PrepareSpec, prepare_split

    manifest = prepare_split(raw_dir, tmp, PrepareSpec("train", res, 16, 10**9, max_short_side=192))
    files = sorted(p for p in (raw_dir / "images").iterdir() if p.is_file())
    images = Subset(TrainImages(tmp, res, (res, 192), shuffle=False), range(manifest["count"]))

    def decode_all() -> None:
        for f in files:
            random_crop(load_rgb(f, 16, 10**9), res, (res, 192))

    def cache_all() -> None:
        for i in range(len(images)):
            images[i]

    t_dec, t_cache = timed(decode_all, 3), timed(cache_all, 5)
    cache_rate = len(images) / t_cache
    return {
        "images": len(files),
        "resolution": res,
        "source_decode_and_crop_images_per_s": len(files) / t_dec,
        "cache_loader_images_per_s": cache_rate,
        "ratio_cache_over_source": t_dec / t_cache,
        "ratio_cache_loader_over_train_step_consumption": cache_rate / train_images_per_s,
    }


_MEM = """
import sys, torch
sys.path.insert(0, {bench!r})
from train_step import make_step, twin_models
from sdvae.metrics import build_lpips
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
lp = build_lpips(); ours, theirs = twin_models("tiny")
x = torch.rand({b}, 3, {r}, {r}) * 2 - 1
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: ru_maxrss would carry the parent's
base = hwm()
ours_run = sys.argv[1] == "ours"
step, _ = make_step(ours if ours_run else theirs, not ours_run, lp, x, one_backward=ours_run)
for _ in range(3):
    step()
print(hwm(), base)
"""


def bench_memory(batch_size: int, res: int) -> dict:
    out: dict = {
        "batch": batch_size,
        "resolution": res,
        "measure": "peak RSS (VmHWM) of a fresh process, reset after loading models",
    }
    for who in ("ours", "diffusers"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEM.format(bench=str(Path(__file__).parent / "speed"), b=batch_size, r=res), who],
            capture_output=True,
            text=True,
            check=True,
        )
        peak, base = map(int, proc.stdout.split()[-2:])
        out[f"{who}_peak_rss_mib"] = peak / 1024
        out[f"{who}_train_step_rss_increase_mib"] = (peak - base) / 1024
    out["ratio_ours_over_diffusers_peak"] = out["ours_peak_rss_mib"] / out["diffusers_peak_rss_mib"]
    return out


H100_DENSE_BF16_FLOPS = 989e12  # NVIDIA's dense BF16 tensor-core peak for the H100 SXM


def machine() -> dict:
    from sdvae.training.timing_cache import machine_identity

    ident = machine_identity()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu": ident["cpu"],
        "cpu_family_model": ident["cpu_family_model"],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_rows(repeats: int, raw: Path, lpips_net: torch.nn.Module) -> dict:
    """Tiny preset, fp32, 64 px, batch 8: every option of the step, then codec, loader and memory."""
    import tempfile

    cpu = torch.device("cpu")
    rows: dict = {"machine": machine(), "command": "python bench/run.py"}
    rows["train_step"] = bench_train_step("tiny", lpips_net, 8, 64, repeats, cpu)
    rows["train_step_before_gan"] = bench_train_step(
        "tiny",
        lpips_net,
        8,
        64,
        repeats,
        cpu,
        variants=("diffusers", "ours_reference", "ours_compiled", "diffusers_compiled"),
        gan=False,
    )
    rows["codec_256"] = bench_codec(2, 256, repeats)
    if (raw / "images").is_dir():
        ours_rate = rows["train_step"][f"{rows['train_step']['best_option']}_images_per_s"]
        with tempfile.TemporaryDirectory() as tmp:
            rows["loader"] = bench_loader(raw, 64, ours_rate, Path(tmp) / "c")
    rows["memory"] = bench_memory(8, 64)
    return rows


def gpu_rows(repeats: int, lpips_net: torch.nn.Module) -> dict:
    """SD f8c4, 256 px, bf16 autocast, batch 8: every option of the step, with MFU from counted FLOPs."""
    cuda = torch.device("cuda")
    rows: dict = {"machine": machine(), "command": "python bench/run.py --device cuda"}
    step_rows = bench_train_step("sd-f8c4", lpips_net, 8, 256, repeats, cuda, torch.bfloat16)
    batch = (torch.rand(8, 3, 256, 256) * 2 - 1).to(cuda)
    flops = {}
    for name in ("diffusers", "ours_one_backward"):  # compiled variants run the same math
        steps = build_variants("sd-f8c4", lpips_net, batch, (name,), True, torch.bfloat16)
        flops[name] = counted_flops(steps[name])
    step_rows["flops_per_image"] = {k: v / 8 for k, v in flops.items()}
    for name in ("diffusers", "ours_reference", "diffusers_compiled", "ours_one_backward", "ours_compiled"):
        algo = "diffusers" if name in ("diffusers", "ours_reference", "diffusers_compiled") else "ours_one_backward"
        rate = step_rows[f"{name}_images_per_s"]
        step_rows[f"{name}_mfu"] = rate * flops[algo] / 8 / H100_DENSE_BF16_FLOPS
    rows["train_step"] = step_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--raw", default=str(ROOT / "data/raw/eval"), help="folder with images/ for the loader row")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    from sdvae.metrics import build_lpips

    lpips_net = build_lpips()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if args.device == "cuda":
        result["gpu"] = gpu_rows(repeats, lpips_net)
    else:
        result["cpu"] = cpu_rows(repeats, Path(args.raw), lpips_net)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
