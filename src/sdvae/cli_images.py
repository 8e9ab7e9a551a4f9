"""Image subcommands of `sdvae`: compare, reconstruct, encode, decode.

Bad inputs never stop a batch: each gets one error line naming it (a corrupt file, a
decompression bomb, an out-of-memory failure alike), the rest still run, and the exit code is
non-zero with a summary. Outputs mirror the input tree and keep the input's full file name
(`a.jpg` -> `a.jpg.png`), so `a.jpg` and `a.png` never collide; two inputs that would still
write one output are refused. Existing outputs are kept unless --overwrite; every output is
written to a temp file and renamed, so a killed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from sdvae.data.images import SkippedImage, load_rgb
from sdvae.data.sources import IMAGE_SUFFIXES
from sdvae.imagefiles import save_rows
from sdvae.io import atomic_path

DEFAULT_MAX_IMAGE_PIXELS = 200_000_000  # the same guard prepare applies (data.max_image_pixels)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InputError(Exception):
    """One input could not be processed; the message names why."""


def _collect(inputs: list[str], suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input root) for files and folders (recursive)."""
    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [
                (p, p.relative_to(item))
                for p in sorted(item.rglob("*"))
                if p.is_file() and p.suffix.lower() in suffixes
            ]
        else:
            found.append((item, Path(item.name)))
    return found


def _load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]; any mode, EXIF-rotated; InputError if unusable."""
    if not path.is_file():
        raise InputError("no such file")
    try:
        arr = load_rgb(path, min_size=1, max_pixels=max_pixels)
    except SkippedImage as exc:
        raise InputError(str(exc)) from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def _load_model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sdvae.formats import load_any

    model = load_any(args.model).eval()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    model.tile_size = args.tile_size or None
    model.max_batch_size = args.batch_size
    return model, device


def output_name(rel: Path, suffix: str) -> Path:
    """`sub/a.jpg` -> `sub/a.jpg.png`: the input's full name stays, so inputs differing only in
    extension get distinct outputs; a latent's `.safetensors` is dropped again on decode."""
    if rel.suffix.lower() == ".safetensors":
        rel = rel.with_suffix("")
    return rel.with_name(rel.name + suffix)


def _claim_targets(items: list[tuple[Path, Path]], out: Path, suffix: str) -> list[tuple[Path, Path | None, str]]:
    """(input, target, why not) per input; a target claimed by an earlier input is refused."""
    owner: dict[Path, Path] = {}
    planned: list[tuple[Path, Path | None, str]] = []
    for path, rel in items:
        target = out / output_name(rel, suffix)
        if target in owner:
            planned.append((path, None, f"would write {target}, which {owner[target]} writes in this run"))
            continue
        owner[target] = path
        planned.append((path, target, ""))
    return planned


def _describe_failure(exc: BaseException) -> str:
    """One line for an unexpected failure; running out of memory says what to try."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return "out of memory while processing this file (try a smaller --tile-size or --batch-size)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


def _run_each(items: list[tuple[Path, Path]], out: Path, suffix: str, desc: str, overwrite: bool, fn) -> int:  # type: ignore[no-untyped-def]
    """Run `fn(input, target)` per input; any single failure (memory included) is reported, not fatal."""
    failed: list[str] = []
    for path, target, refused in tqdm(
        _claim_targets(items, out, suffix), desc=desc, unit="file", disable=len(items) < 2
    ):
        try:
            if target is None:
                raise InputError(refused)
            if target.exists() and not overwrite:
                raise InputError(f"output {target} exists (use --overwrite)")
            fn(path, target)
        except InputError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed.append(str(path))
        except (MemoryError, RuntimeError, OSError, ValueError) as exc:  # e.g. the allocator giving up on one file
            print(f"error: {path}: {_describe_failure(exc)}", file=sys.stderr)
            failed.append(str(path))
    done = len(items) - len(failed)
    print(f"{desc}: {done} done, {len(failed)} failed", file=sys.stderr)
    return 1 if failed or not items else 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    model, device = _load_model(args)
    out = Path(args.output)

    def one(path: Path, target: Path) -> None:
        x = _load_image(path, args.max_image_pixels).to(device=device, dtype=DTYPES[args.dtype])
        with torch.no_grad():
            y = model.reconstruct(x)
        save_rows([y], target)

    items = _collect(args.inputs, IMAGE_SUFFIXES)
    return _run_each(items, out, ".png", "reconstruct", args.overwrite, one)


def cmd_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from sdvae.models.autoencoder_kl import pad_to_multiple

    model, device = _load_model(args)
    out = Path(args.output)

    def one(path: Path, target: Path) -> None:
        x = _load_image(path, args.max_image_pixels).to(device=device, dtype=DTYPES[args.dtype])
        h, w = x.shape[-2:]
        with torch.no_grad():
            latent = model.encode_to_latent(pad_to_multiple(x, model.downsample_factor))
        meta = {
            "scaling_factor": repr(model.config.scaling_factor),
            "shift_factor": repr(model.config.shift_factor),
            "height": str(h),
            "width": str(w),
            "downsample_factor": str(model.downsample_factor),
            "source": path.name,
        }
        with atomic_path(target) as tmp:
            save_file({"latent": latent[0].float().cpu().contiguous()}, str(tmp), metadata=meta)

    items = _collect(args.inputs, IMAGE_SUFFIXES)
    return _run_each(items, out, ".safetensors", "encode", args.overwrite, one)


def cmd_decode(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    model, device = _load_model(args)
    out = Path(args.output)

    def one(path: Path, target: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                latent = fh.get_tensor("latent")
        except Exception as exc:
            raise InputError(f"not an sdvae latent file ({exc})") from exc
        scale = float(meta.get("scaling_factor", model.config.scaling_factor))
        # a file without metadata was made for this model: its own shift, as decode_from_latent applies
        shift = meta.get("shift_factor", repr(model.config.shift_factor))
        z = latent[None].to(device=device, dtype=DTYPES[args.dtype]) / scale
        z = z + (0.0 if shift == "None" else float(shift))  # undo exactly what encoding applied
        with torch.no_grad():
            x = model.decode(z)
        h, w = int(meta.get("height", x.shape[-2])), int(meta.get("width", x.shape[-1]))
        save_rows([x[..., :h, :w]], target)

    return _run_each(_collect(args.inputs, (".safetensors",)), out, ".png", "decode", args.overwrite, one)


def cmd_compare(args: argparse.Namespace) -> int:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from sdvae.metrics import build_lpips

    try:
        a, b = _load_image(Path(args.a), args.max_image_pixels), _load_image(Path(args.b), args.max_image_pixels)
    except InputError as exc:
        print(f"sdvae compare: {exc}", file=sys.stderr)
        return 2
    if a.shape != b.shape:
        print(
            f"sdvae compare: sizes differ: {args.a} is {a.shape[-1]}x{a.shape[-2]}, "
            f"{args.b} is {b.shape[-1]}x{b.shape[-2]}",
            file=sys.stderr,
        )
        return 2
    with torch.no_grad():
        lp = float(build_lpips()(a, b).item())
    a01, b01 = (a + 1) / 2, (b + 1) / 2
    print(
        json.dumps(
            {
                "lpips": lp,
                "psnr": float(peak_signal_noise_ratio(b01, a01, data_range=1.0)),
                "ssim": float(structural_similarity_index_measure(b01, a01, data_range=1.0)),
            }
        )
    )
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers folder (ours or any SD-style VAE) or LDM checkpoint")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--tile-size", type=int, default=512, help="tile images with a side above this (0 = never)")
    p.add_argument("--batch-size", type=int, default=4, help="largest batch sent through the model at once")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _guard_arg(p)


def _guard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse larger images as decompression bombs (default {DEFAULT_MAX_IMAGE_PIXELS:,})",
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compare", help="LPIPS, PSNR and SSIM between two images of the same size (JSON)")
    p.add_argument("a")
    p.add_argument("b")
    _guard_arg(p)
    p.set_defaults(func=cmd_compare)
    for name, func, what in (
        ("reconstruct", cmd_reconstruct, "images (files or folders) -> reconstructed PNGs"),
        ("encode", cmd_encode, "images -> scaled latents (.safetensors, metadata recorded)"),
        ("decode", cmd_decode, "latent .safetensors files -> PNGs"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("inputs", nargs="+", help="files or folders")
        _model_args(p)
        p.set_defaults(func=func)
