"""CompVis latent-diffusion checkpoints (`first_stage_model.*` or bare `encoder.down.N...`).

LDM keeps attention projections as 1x1 convs and indexes decoder levels from the highest
resolution; diffusers uses linears and runs them lowest resolution first. This module maps
between the two layouts both ways, exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdvae.io import atomic_path
from sdvae.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_LINEAR_FROM_CONV = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _ldm_to_ours_key(key: str, levels: int) -> str | None:
    parts = key.split(".")
    part, rest = parts[0], parts[1:]
    if part in ("quant_conv", "post_quant_conv"):
        return key
    if part not in ("encoder", "decoder"):
        return None
    head = rest[0]
    if head in _TOP:
        return ".".join([part, _TOP[head], *rest[1:]])
    if head == "mid":
        sub = rest[1]
        if sub in ("block_1", "block_2"):
            idx = "0" if sub == "block_1" else "1"
            return ".".join([part, "mid_block.resnets", idx, _RESNET[rest[2]], *rest[3:]])
        if sub == "attn_1":
            return ".".join([part, "mid_block.attentions.0", _ATTN[rest[2]], *rest[3:]])
    if head in ("down", "up"):
        level = int(rest[1])
        block = "down_blocks" if head == "down" else "up_blocks"
        ours_level = level if head == "down" else levels - 1 - level
        kind = rest[2]
        if kind == "block":
            return ".".join([part, block, str(ours_level), "resnets", rest[3], _RESNET[rest[4]], *rest[5:]])
        if kind in ("downsample", "upsample"):
            sampler = "downsamplers" if kind == "downsample" else "upsamplers"
            return ".".join([part, block, str(ours_level), sampler, "0", *rest[3:]])
    raise KeyError(f"unrecognised LDM autoencoder key {key!r}")


def _invert(key: str, levels: int) -> str:
    inv_res = {v: k for k, v in _RESNET.items()}
    inv_attn = {v: k for k, v in _ATTN.items()}
    inv_top = {v: k for k, v in _TOP.items()}
    parts = key.split(".")
    part, rest = parts[0], parts[1:]
    if part in ("quant_conv", "post_quant_conv"):
        return key
    head = rest[0]
    if head in inv_top:
        return ".".join([part, inv_top[head], *rest[1:]])
    if head == "mid_block":
        if rest[1] == "resnets":
            return ".".join([part, "mid", "block_1" if rest[2] == "0" else "block_2", inv_res[rest[3]], *rest[4:]])
        name = "to_out.0" if rest[3] == "to_out" else rest[3]
        tail = rest[5:] if rest[3] == "to_out" else rest[4:]
        return ".".join([part, "mid", "attn_1", inv_attn[name], *tail])
    if head in ("down_blocks", "up_blocks"):
        ours_level = int(rest[1])
        level = ours_level if head == "down_blocks" else levels - 1 - ours_level
        ldm = "down" if head == "down_blocks" else "up"
        if rest[2] == "resnets":
            return ".".join([part, ldm, str(level), "block", rest[3], inv_res[rest[4]], *rest[5:]])
        sampler = "downsample" if head == "down_blocks" else "upsample"
        return ".".join([part, ldm, str(level), sampler, *rest[4:]])
    raise KeyError(f"unrecognised autoencoder key {key!r}")


VAE_PREFIXES = ("first_stage_model.", "vae.")  # a whole SD/SDXL/SD3 checkpoint; some tools' VAE files


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors, whatever else the file holds (UNet, text encoders, loss)."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


class NotAnAutoencoder(ValueError):
    """A checkpoint without an LDM-layout autoencoder; the message names what it holds."""


def _check_layout(path: Path, state: dict[str, torch.Tensor]) -> None:
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        raise NotAnAutoencoder(f"{path}: diffusers-layout VAE weights; load the folder with its config.json instead")
    if "encoder.down.0.block.0.conv1.weight" in state and "decoder.conv_in.weight" in state:
        return
    heads = sorted({k.split(".")[0] for k in state})[:8]
    raise NotAnAutoencoder(
        f"{path}: no LDM autoencoder (encoder.* / decoder.*, bare or under {' or '.join(VAE_PREFIXES)}); "
        f"found {len(state)} tensors under {heads}"
    )


def read_ldm_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an LDM checkpoint, read safely (safetensors, or torch.load with weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    vae = _strip_prefix({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    _check_layout(path, vae)
    return vae


def infer_config(state: dict[str, torch.Tensor], norm_num_groups: int = 32) -> AutoencoderKLConfig:
    """Architecture from tensor shapes (LDM checkpoints carry no config)."""
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    widths = tuple(int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    return AutoencoderKLConfig(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=int(state["decoder.conv_in.weight"].shape[1]),
        norm_num_groups=norm_num_groups,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
    )


def ldm_to_ours(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _ldm_to_ours_key(key, levels)
        if new is None:
            continue
        out[new] = value.flatten(1) if _LINEAR_FROM_CONV.search(key) else value
    return out


def ours_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _invert(key, levels)
        out[new] = value[:, :, None, None] if _LINEAR_FROM_CONV.search(new) else value
    return out


# What tensor shapes cannot tell, kept in the safetensors header of the files we write: the whole
# diffusers config (factors, latents mean/std, force_upcast), so `load_ldm` rebuilds the model
# exactly. Files from elsewhere carry none: every SD-family VAE uses 32 groups, and states its
# factors in its family's config (`--preset` / `model.preset`).
_CONFIG_METADATA = "sdvae_config"
_SOURCE_METADATA = "sdvae_source"
_KEPT = ("norm_num_groups", "scaling_factor", "shift_factor")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def single_file_metadata(path: str | Path) -> dict[str, object]:
    """The sdvae config and provenance a single file carries (empty for files from elsewhere)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k: json.loads(meta[k]) for k in (_CONFIG_METADATA, _SOURCE_METADATA) if k in meta}


def carries_factors(path: str | Path) -> bool:
    """Whether a single file states its own latent factors (files sdvae writes do; others do not)."""
    stored = single_file_metadata(path).get(_CONFIG_METADATA)
    return isinstance(stored, dict) and "scaling_factor" in stored


def _stored_config(path: Path) -> tuple[dict[str, object], AutoencoderKLConfig | None]:
    """(the kept keys, the full config where the file has one)."""
    from sdvae.formats.diffusers import from_diffusers_config

    stored = single_file_metadata(path).get(_CONFIG_METADATA) or {}
    assert isinstance(stored, dict)
    full = from_diffusers_config(stored) if "block_out_channels" in stored else None
    return {k: stored[k] for k in _KEPT if k in stored}, full


def load_ldm(path: str | Path, norm_num_groups: int | None = None, **config_overrides: object) -> AutoencoderKL:
    state = read_ldm_state(path)
    stored, full = _stored_config(Path(path))
    if full is not None:  # a file we wrote: its whole config (statistics, force_upcast, sample size) stays
        overrides = {**config_overrides, **({"norm_num_groups": norm_num_groups} if norm_num_groups else {})}
        cfg = full.replace(**overrides) if overrides else full
    else:
        stored_groups = stored.pop("norm_num_groups", 32)
        groups = norm_num_groups or int(stored_groups)  # type: ignore[call-overload]
        cfg = infer_config(state, groups).replace(**{**stored, **config_overrides})
    model = AutoencoderKL(cfg)
    model.load_state_dict(ldm_to_ours(state, len(cfg.block_out_channels)), strict=True)
    return model


def save_ldm(
    model: AutoencoderKL,
    path: str | Path,
    prefix: str = "",
    dtype: str = "fp32",
    source: dict[str, str] | None = None,
) -> Path:
    """Write an LDM-layout safetensors file: bare keys (`prefix` "first_stage_model." for a
    checkpoint-style file), tensors in `dtype`, the full config and `source` in its header."""
    from sdvae.formats.diffusers import to_diffusers_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    levels = len(model.config.block_out_channels)
    state = ours_to_ldm({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, levels)
    metadata = {"format": "pt", _CONFIG_METADATA: json.dumps(to_diffusers_config(model.config), sort_keys=True)}
    if source:
        metadata[_SOURCE_METADATA] = json.dumps(source, sort_keys=True)
    cast = DTYPES[dtype]
    with atomic_path(path) as tmp:
        tensors = {prefix + k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
