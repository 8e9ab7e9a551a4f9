"""`sdvae convert SRC DST`: between a diffusers folder, one LDM-layout single file and a whole
checkpoint's VAE; the layout follows DST (a `.safetensors` name: a single file)."""

from __future__ import annotations

import argparse
import sys


def cmd_convert(args: argparse.Namespace) -> int:
    from sdvae.convert import ConversionError, as_json, convert

    try:
        result = convert(args.src, args.dst, args.dtype, args.preset, args.overwrite)
    except ConversionError as exc:
        print(f"sdvae convert: {exc}", file=sys.stderr)
        return 2
    print(as_json(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from sdvae.models.autoencoder_kl import PRESETS

    p = sub.add_parser("convert", help="a VAE between diffusers folder, single LDM file and full checkpoint")
    p.add_argument("src", help="diffusers folder, LDM/SD/SDXL/SD3/FLUX .safetensors, or .ckpt/.pt")
    p.add_argument("dst", help="NAME.safetensors: one bare LDM-layout file; anything else: a diffusers folder")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="tensor type written")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the family of a single file from elsewhere, for its scaling/shift factors (they are not in such files)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)
