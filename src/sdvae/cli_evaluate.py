"""`sdvae evaluate MODEL [MODEL ...] --data SOURCE`: score any VAEs and bicubic on any image set."""

from __future__ import annotations

import argparse
import sys

from sdvae.config import WeightsConfig


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sdvae.data.common import SourceError
    from sdvae.scoring.report import markdown_table, save_grid, write_result
    from sdvae.scoring.run import NothingScored, ScoreOptions, score_models

    options = ScoreOptions(
        resolution=args.resolution,
        max_images=args.max_images,
        batch_size=args.batch_size,
        devices=args.devices,
        accelerator=args.accelerator,
        precision=args.precision,
        sample_seed=args.seed if args.sample else None,
        workers=args.workers,
        min_size=args.min_size,
        image_column=args.image_column,
        grid_images=args.grid_images if args.grid else 0,
        save_images=args.save_images,
        diffusability=not args.no_diffusability,
        ifid_max_images=args.ifid_max_images,
    )
    weights = WeightsConfig(lpips_vgg=args.lpips_vgg, inception=args.inception)
    try:
        result = score_models([(m, m) for m in args.models], args.data, options, weights)
    except (NothingScored, SourceError) as exc:
        print(f"sdvae evaluate: {exc}", file=sys.stderr)
        return 1
    if result is None:  # a DDP rank other than 0: rank 0 reports
        return 0
    for failure in result["failed_models"]:
        print(f"sdvae evaluate: skipped model: {failure['error']}", file=sys.stderr)
    for skip in result["skipped"]:
        print(f"sdvae evaluate: skipped image {skip['name']}: {skip['reason']}", file=sys.stderr)
    print(markdown_table(result))
    if args.grid:
        save_grid(result, args.grid)
    if args.out:
        write_result(result, args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evaluate",
        help="score VAEs (diffusers folders, LDM/SD single files, 'bicubic') on an image set: table, JSON, grid",
        description="Per-image PSNR and SSIM, LPIPS, rFID and KID of each model on the same images, and "
        "how diffusable its latents are (the protocol: docs/evaluation.md).",
    )
    p.add_argument("models", nargs="+", help="diffusers folder, pipeline folder with vae/, .ckpt/.safetensors, bicubic")
    p.add_argument("--data", required=True, help="folder:<path>, hf:<name>[:split], builtin:<set>, or an eval cache")
    p.add_argument("--resolution", type=int, default=256, help="short side resized to this, then center crop")
    p.add_argument("--max-images", type=int, default=0, help="0 = every image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--devices", type=int, default=1, help="processes (DDP) on --accelerator")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--precision", default="32", choices=("32", "bf16-mixed"), help="the VAEs' autocast")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample (seeded) instead of the mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="loader processes decoding images")
    p.add_argument("--min-size", type=int, default=16, help="images with a shorter side are skipped")
    p.add_argument("--image-column", default="image", help="for hf: sources")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--grid", help="PNG grid of the first images, one labelled row per model")
    p.add_argument("--grid-images", type=int, default=8)
    p.add_argument("--save-images", help="folder for PNGs of the inputs and every model's reconstructions")
    p.add_argument(
        "--no-diffusability",
        action="store_true",
        help="leave out the latent section (scale/rotation equivariance, latent spectrum, iFID)",
    )
    p.add_argument("--ifid-max-images", type=int, default=5000, help="iFID's nearest-neighbour pool: the first N")
    p.add_argument("--lpips-vgg", help="LPIPS VGG16 weights file (else resolved offline)")
    p.add_argument("--inception", help="FID Inception weights file (else resolved offline)")
    p.set_defaults(func=cmd_evaluate)
