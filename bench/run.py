"""Benchmarks, each a ratio against a reference measured in the same run on the same machine.

Rows: training step (ours vs the same step on diffusers.AutoencoderKL), encode/decode at 256 px
(ours vs diffusers), shard loader vs JPEG decoding, peak memory of a training step, and what
channels_last gives. Writes metrics/bench.json.

    python bench/run.py [--quick] [--out metrics/bench.json]
"""

from __future__ import annotations

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


def tiny_models():  # type: ignore[no-untyped-def]
    """Ours and diffusers' AutoencoderKL with identical config and identical weights."""
    import diffusers

    from sdvae.models import AutoencoderKL

    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset("tiny")
    c = ours.config
    theirs = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * len(c.block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(c.block_out_channels),
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
    )
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_train_step(ae: torch.nn.Module, is_diffusers: bool, lpips_net: torch.nn.Module, batch: torch.Tensor):
    """Generator forward+backward with L1 + LPIPS + GAN loss, discriminator step, both optimizers."""
    from sdvae.models import NLayerDiscriminator

    disc = NLayerDiscriminator(3, 32, 3, "group")
    opt_g = torch.optim.AdamW(ae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def step() -> None:
        if is_diffusers:
            post = ae.encode(batch).latent_dist
            rec = ae.decode(post.sample()).sample
        else:
            rec, post = ae(batch)
        disc.requires_grad_(False)
        loss = (batch - rec).abs().mean() + lpips_net(batch, rec).mean() - disc(rec).mean() + 1e-6 * post.kl().mean()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        disc.requires_grad_(True)
        d_loss = torch.relu(1 - disc(batch)).mean() + torch.relu(1 + disc(rec.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    return step


def bench_train(batch_size: int, res: int, repeats: int) -> dict:
    from sdvae.metrics import build_lpips

    lpips_net = build_lpips()
    ours, theirs = tiny_models()
    x = torch.rand(batch_size, 3, res, res) * 2 - 1
    steps = {
        "ours": make_train_step(ours, False, lpips_net, x),
        "diffusers": make_train_step(theirs, True, lpips_net, x),
    }
    t = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for k, fn in steps.items():
            t[k].append(timed(fn, 1, warmup=0))
    for k in steps:
        t[k] = statistics.median(t[k][1:] or t[k])
    out = {f"{k}_images_per_s": batch_size / v for k, v in t.items()}
    out["ratio_ours_over_diffusers"] = t["diffusers"] / t["ours"]
    ours_cl = ours.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    cl = timed(make_train_step(ours_cl, False, lpips_net, xcl), repeats)
    out["ours_channels_last_images_per_s"] = batch_size / cl
    out["channels_last_ratio_over_ours"] = t["ours"] / cl
    out.update(batch=batch_size, resolution=res, preset="tiny")
    return out


def bench_codec(batch_size: int, res: int, repeats: int) -> dict:
    ours, theirs = tiny_models()
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
    """Reading the shard cache vs decoding + resizing the same JPEG/PNG files each time."""
    import numpy as np

    from sdvae.data.datamodule import ShardDataset
    from sdvae.data.images import center_crop, load_rgb, resize_short_side
    from sdvae.data.prepare import PrepareSpec, prepare_split

    prepare_split(raw_dir, tmp, PrepareSpec("eval", res, 16, 10**9, 1024))
    files = sorted(p for p in (raw_dir / "images").iterdir() if p.is_file())
    ds = ShardDataset(tmp, hflip=True)

    def decode_all() -> None:
        for f in files:
            np.ascontiguousarray(center_crop(resize_short_side(load_rgb(f, 16, 10**9), res), res))

    def shards_all() -> None:
        for i in range(len(ds)):
            ds[i]

    t_dec, t_shard = timed(decode_all, 3), timed(shards_all, 20)
    shard_rate = len(ds) / t_shard
    return {
        "images": len(files),
        "resolution": res,
        "jpeg_decode_images_per_s": len(files) / t_dec,
        "shard_images_per_s": shard_rate,
        "ratio_shard_over_decode": t_dec / t_shard,
        "ratio_shard_over_train_step_consumption": shard_rate / train_images_per_s,
    }


_MEM = """
import sys, torch
sys.path.insert(0, {bench!r})
from run import make_train_step, tiny_models
from sdvae.metrics import build_lpips
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
lp = build_lpips(); ours, theirs = tiny_models()
x = torch.rand({b}, 3, {r}, {r}) * 2 - 1
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: ru_maxrss would carry the parent's
base = hwm()
step = make_train_step(ours if sys.argv[1] == "ours" else theirs, sys.argv[1] != "ours", lp, x)
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
            [sys.executable, "-c", _MEM.format(bench=str(Path(__file__).parent), b=batch_size, r=res), who],
            capture_output=True,
            text=True,
            check=True,
        )
        peak, base = map(int, proc.stdout.split()[-2:])
        out[f"{who}_peak_rss_mib"] = peak / 1024
        out[f"{who}_train_step_rss_increase_mib"] = (peak - base) / 1024
    out["ratio_ours_over_diffusers_peak"] = out["ours_peak_rss_mib"] / out["diffusers_peak_rss_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    parser.add_argument("--raw", default=str(ROOT / "data/raw/eval"), help="folder with images/ for the loader row")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    import tempfile

    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "command": "python bench/run.py",
    }
    result["train_step"] = bench_train(8, 64, repeats)
    result["codec_256"] = bench_codec(2, 256, repeats)
    raw = Path(args.raw)
    if (raw / "images").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            result["loader"] = bench_loader(raw, 64, result["train_step"]["ours_images_per_s"], Path(tmp) / "c")
    result["memory"] = bench_memory(8, 64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
