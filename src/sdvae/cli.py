"""`sdvae` command: info, compare, reconstruct, encode, decode, evaluate."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from sdvae.config import ConfigError, load_config


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, device and the resolved, validated config."""
    import importlib.metadata as md

    import torch

    from sdvae.models.factory import architecture
    from sdvae.training.measured import cached_decision, forget_timings
    from sdvae.training.starting import starting_autoencoder

    versions = {}
    for dist in (
        "sdvae",
        "torch",
        "torchvision",
        "lightning",
        "torchmetrics",
        "torch-fidelity",
        "lpips",
        "dvc",
        "mlflow",
        "datasets",
        "safetensors",
        "diffusers",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": _device_name(),
        "threads": torch.get_num_threads(),
    }
    try:
        cfg = load_config(args.params)
        arch = architecture(cfg.model, cfg.train.resolution)
        info["config"] = cfg.to_dict()
        if cfg.train.init_from is not None and not Path(cfg.train.init_from).exists():
            info["measured_here"] = f"train.init_from {cfg.train.init_from} not found: nothing to look up"
        else:
            autoencoder = starting_autoencoder(cfg)  # the architecture training times
            if args.retime:
                forgot = forget_timings(cfg, autoencoder)
                info["retimed"] = "timings dropped: the next run measures afresh" if forgot else "nothing cached"
            info["measured_here"] = cached_decision(cfg, autoencoder)
        info["architecture"] = {**arch.__dict__, "downsample_factor": arch.downsample_factor}
    except ConfigError as exc:
        print(f"sdvae: invalid params: {exc}", file=sys.stderr)
        return 2
    if args.model:
        info["model"] = _model_info(args.model, args.image, args.resolution)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _model_info(spec: str, image: str | None, resolution: int) -> dict[str, object]:
    """A model's config and factors, and whether decoding one image's latents in fp16 overflows."""
    from sdvae.data.images import load_rgb
    from sdvae.formats import load_any
    from sdvae.fp16_safety import PHOTO, fp16_decode_report_on_photo
    from sdvae.models.autoencoder_kl import count_parameters

    model = load_any(spec).eval()
    report = fp16_decode_report_on_photo(model, load_rgb(image, 16, 10**9) if image else None, resolution)
    c = model.config
    return {
        "source": spec,
        "parameters": count_parameters(model),
        "latent_channels": c.latent_channels,
        "downsample_factor": model.downsample_factor,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "force_upcast": c.force_upcast,
        "fp16_decode": {"image": image or PHOTO, **report},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device and the resolved config")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--model", help="also a VAE's factors and an fp16 decode check (folder or single file)")
    p.add_argument("--image", help="the image for the fp16 check (default: scikit-image's astronaut)")
    p.add_argument("--resolution", type=int, default=256, help="its side for the fp16 check")
    p.add_argument(
        "--retime",
        action="store_true",
        help="forget this machine's step timings and calibration for these params: the next run measures afresh "
        "(runs already started keep the decisions in their checkpoints)",
    )
    p.set_defaults(func=cmd_info)
    from sdvae import cli_convert, cli_evaluate, cli_images

    cli_images.register(sub)
    cli_evaluate.register(sub)
    cli_convert.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
