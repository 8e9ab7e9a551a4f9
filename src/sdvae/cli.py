"""`sdvae` command: info, compare, reconstruct, encode, decode, evaluate."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

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
    from sdvae.training.precision import resolve_precision

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
        info["train_precision_here"] = resolve_precision(cfg.train.precision, cfg.train.accelerator)
        info["architecture"] = {**arch.__dict__, "downsample_factor": arch.downsample_factor}
    except ConfigError as exc:
        print(f"sdvae: invalid params: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device and the resolved config")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=cmd_info)
    from sdvae import cli_evaluate, cli_images

    cli_images.register(sub)
    cli_evaluate.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
