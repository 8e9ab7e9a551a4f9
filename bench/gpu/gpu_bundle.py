"""Fill `.gpu/` with what a bare GPU machine lacks to run bench/gpu/gpu_check.py, within 64 MiB.

A lent GPU machine has Python 3.12 with torch, torchvision, lightning, torchmetrics, safetensors,
numpy, pillow, pyyaml, scikit-image and matplotlib, and no network. This writes, on a machine
with the project installed:
- `wheels/`: Python 3.12 manylinux wheels of every runtime dependency it lacks (diffusers, lpips,
  litdata, torch-fidelity and their own needs), at the versions uv.lock pins;
- `weights/lpips_vgg16_fp16.safetensors`: the LPIPS VGG16 backbone in fp16 (29 MB instead of 59);
- `photos/train/`: downscaled crops of the built-in train photos; `photos/eval/`: the eval photos;
- `bundle.json`: what is there and how big.
The working tree (src/, bench/) travels on its own. The Inception weights (44 MB even in fp16) do
not fit beside the rest, so the GPU evaluation reports PSNR, SSIM and LPIPS without rFID / KID.

    python bench/gpu/gpu_bundle.py [--dest .gpu] [--python-version 3.12] [--train-crops 8]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import Marker

ROOT = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 64 * 2**20
MACHINE_HAS = (
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "safetensors",
    "numpy",
    "pillow",
    "pyyaml",
    "scikit-image",
    "matplotlib",
)
NEEDED = ("diffusers", "lpips", "litdata", "torch-fidelity")
# in the lock but never imported by training, evaluation or the diffusers comparison (checked with
# sys.modules after importing them); together 9.6 MB the bundle cannot spare
NOT_IMPORTED = {
    "obstore": "litdata's object-store backend, imported only for remote paths",
    "hf-xet": "huggingface_hub's Xet transfer, used only when downloading from a hub",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def locked_closure(roots: tuple[str, ...], python_version: str) -> dict[str, str]:
    """name -> pinned version of `roots` and everything they need on Linux x86-64, from uv.lock."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    env = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        package = packages[name]
        out[name] = package["version"]
        for dep in package.get("dependencies", []):
            if "marker" not in dep or Marker(dep["marker"]).evaluate(env):
                todo.append(dep["name"])
    return out


def download_wheels(wanted: dict[str, str], dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pip = [str(ROOT / ".tools/bin/python"), "-m", "pip"]  # uv's venv has no pip; the bootstrap venv does
    cmd = [*pip, "download", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, *platforms, "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)


def write_vgg_fp16(dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from sdvae.pretrained import load_vgg16_features, resolve_vgg16

    features = load_vgg16_features(resolve_vgg16())
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in features.items()}, str(dest))


def _photos(spec: str) -> list[tuple[str, bytes]]:
    from sdvae.data.sources import iter_source
    from sdvae.pretrained import default_cache_dir

    cache = default_cache_dir()
    return list(iter_source(spec, "image", cache / "downloads", cache / "sources" / "licenses"))


def write_photos(dest: Path, train_crops: int, train_short: int, eval_short: int, seed: int = 0) -> dict[str, int]:
    """Random-scale crops of each train photo and every eval photo, downscaled, as JPEG."""
    from PIL import Image

    from sdvae.data.images import to_rgb

    rng = random.Random(seed)
    counts = {}
    for split, spec in (("train", "builtin:photos"), ("eval", "builtin:classic")):
        out = dest / split
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for name, data in _photos(spec):
            img = to_rgb(Image.open(io.BytesIO(data)))
            stem = Path(name).stem
            if split == "eval":
                scale = eval_short / min(img.size)
                img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(
                    out / f"{stem}.jpg", quality=95
                )
                n += 1
                continue
            for k in range(train_crops):
                side = int(min(img.size) * rng.uniform(0.4, 1.0))
                w, h = min(img.width, int(side * 4 / 3)), side
                x, y = rng.randrange(img.width - w + 1), rng.randrange(img.height - h + 1)
                crop = img.crop((x, y, x + w, y + h))
                scale = train_short / h
                crop = crop.resize((round(w * scale), train_short), Image.BICUBIC)
                crop.save(out / f"{stem}_{k}.jpg", quality=90)
                n += 1
        counts[split] = n
    return counts


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / ".gpu"))
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--train-crops", type=int, default=6, help="crops per built-in train photo")
    parser.add_argument("--train-short-side", type=int, default=288)
    parser.add_argument("--eval-short-side", type=int, default=256)
    args = parser.parse_args()
    dest = Path(args.dest)
    for part in ("wheels", "photos"):  # a rerun replaces them: no stale wheel or photo stays
        shutil.rmtree(dest / part, ignore_errors=True)
    needed = locked_closure(NEEDED, args.python_version)
    present = locked_closure(MACHINE_HAS, args.python_version)
    wanted = {k: v for k, v in needed.items() if k not in present and k not in NOT_IMPORTED}
    download_wheels(wanted, dest / "wheels", args.python_version)
    write_vgg_fp16(dest / "weights" / "lpips_vgg16_fp16.safetensors")
    photos = write_photos(dest / "photos", args.train_crops, args.train_short_side, args.eval_short_side)
    sizes = {part: folder_bytes(dest / part) for part in ("wheels", "weights", "photos")}
    sizes["working tree"] = tracked_bytes()  # travels in the same 64 MiB
    total = sum(sizes.values())
    info = {
        "python_version": args.python_version,
        "wheels": sorted(p.name for p in (dest / "wheels").glob("*.whl")),
        "left_out": NOT_IMPORTED,
        "photos": photos,
        "bytes": sizes,
        "total_mib": round(total / 2**20, 2),
    }
    (dest / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    for part, size in sizes.items():
        print(f"{part:13s} {size / 2**20:7.2f} MiB")
    print(f"{'total':13s} {total / 2**20:7.2f} MiB ({dest} and the working tree; limit 64 MiB)")
    if total > LIMIT_BYTES:
        sys.exit(f"{total / 2**20:.1f} MiB: more than the 64 MiB a device call carries")


if __name__ == "__main__":
    main()
