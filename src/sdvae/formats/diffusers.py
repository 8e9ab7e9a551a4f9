"""Hugging Face diffusers folder format: config.json + diffusion_pytorch_model.safetensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdvae.io import atomic_dir
from sdvae.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
DIFFUSERS_VERSION = "0.42.1"

# Older hub VAEs (before diffusers 0.14) name the mid-block attention projections differently.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def to_diffusers_config(cfg: AutoencoderKLConfig, **extra: Any) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    out = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": list(cfg.latents_mean) if cfg.latents_mean else None,
        "latents_std": list(cfg.latents_std) if cfg.latents_std else None,
        "force_upcast": cfg.force_upcast,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention,
    }
    out.update(extra)
    return out


def from_diffusers_config(data: dict[str, Any]) -> AutoencoderKLConfig:
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config.json describes {data.get('_class_name')!r}, not AutoencoderKL")
    if data.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn {data.get('act_fn')!r} is not supported (only 'silu')")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = set(data.get(key, [want]))
        if kinds != {want}:
            raise ValueError(f"{key} {sorted(kinds)} is not supported (only {want})")
    mean, std = data.get("latents_mean"), data.get("latents_std")
    return AutoencoderKLConfig(
        in_channels=int(data.get("in_channels", 3)),
        out_channels=int(data.get("out_channels", 3)),
        block_out_channels=tuple(int(c) for c in data.get("block_out_channels", (64,))),
        layers_per_block=int(data.get("layers_per_block", 1)),
        latent_channels=int(data.get("latent_channels", 4)),
        norm_num_groups=int(data.get("norm_num_groups", 32)),
        mid_block_add_attention=bool(data.get("mid_block_add_attention", True)),
        use_quant_conv=bool(data.get("use_quant_conv", True)),
        use_post_quant_conv=bool(data.get("use_post_quant_conv", True)),
        scaling_factor=float(data.get("scaling_factor", 0.18215)),
        shift_factor=None if data.get("shift_factor") is None else float(data["shift_factor"]),
        latents_mean=tuple(float(v) for v in mean) if mean else None,
        latents_std=tuple(float(v) for v in std) if std else None,
        sample_size=int(data["sample_size"]) if isinstance(data.get("sample_size"), int) else 256,
        force_upcast=bool(data.get("force_upcast", True)),
    )


def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new) if ".attentions." in key else key
        out[key] = value
    return out


def load_diffusers(path: str | Path, subfolder: str | None = None) -> AutoencoderKL:
    """Load our model from a diffusers folder (ours or any SD-style VAE, e.g. sd-vae-ft-mse)."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file() and (folder / "vae" / "config.json").is_file():
        folder, cfg_file = folder / "vae", folder / "vae" / "config.json"  # a whole pipeline folder
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a diffusers AutoencoderKL folder)")
    model = AutoencoderKL(from_diffusers_config(json.loads(cfg_file.read_text())))
    if (folder / WEIGHTS_NAME).is_file():
        state = load_file(str(folder / WEIGHTS_NAME))
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        state = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    model.load_state_dict(_rename_legacy(state), strict=True)
    return model


def save_diffusers(
    model: AutoencoderKL,
    path: str | Path,
    extra_files: dict[str, str] | None = None,
    also: Callable[[Path], object] | None = None,
) -> Path:
    """Write config.json + safetensors (+ extra text files, + what `also(folder)` writes) atomically
    into `path`."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(to_diffusers_config(model.config), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if also is not None:
            also(tmp)
    return Path(path)
