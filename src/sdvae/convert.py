"""Convert a VAE between the layouts people load: a diffusers folder, one bare LDM-layout
`.safetensors` (A1111, Forge, ComfyUI, InvokeAI), or a whole SD/SDXL/SD3 checkpoint or `.ckpt`
(its VAE extracted).

Why `--preset` exists: single files from elsewhere carry no scaling/shift factors (BFL's
ae.safetensors, sdxl_vae.safetensors); their family supplies them. Files sdvae writes carry their
whole config, so they convert back exactly. fp32 folder -> file -> folder is bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdvae.formats import load_any
from sdvae.formats.diffusers import save_diffusers
from sdvae.formats.ldm import DTYPES, NotAnAutoencoder, carries_factors, save_ldm
from sdvae.fp16_safety import fp16_decode_report_on_photo
from sdvae.models.autoencoder_kl import PRESETS, AutoencoderKL


class ConversionError(ValueError):
    """A conversion that cannot be done; the message is one line for the user."""


@dataclass(frozen=True)
class Converted:
    source: str
    target: str
    layout: str  # "diffusers folder" | "single file"
    dtype: str
    scaling_factor: float
    shift_factor: float | None


def check_dtype(model: AutoencoderKL, dtype: str, fp16_report: dict[str, object] | None = None) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp16":
        # without export's report (made on training crops): the check `sdvae info --model` makes
        report = fp16_report if fp16_report is not None else fp16_decode_report_on_photo(model, None, 256)
        if report["overflows_fp16"]:
            raise ConversionError(
                f"fp16 refused: decoding in fp16 overflows (largest activation {report['max_abs_activation']:.4g} "
                f"at {report['max_abs_activation_at']}, fp16 ends at 65504); use fp32 or bf16"
            )


def _target_layout(dst: Path) -> str:
    if dst.suffix == ".safetensors":
        return "single file"
    if dst.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ConversionError(f"{dst}: sdvae writes weights as safetensors only (a {dst.suffix} file is a pickle)")
    return "diffusers folder"


FAMILY_LAYOUT = ("latent_channels", "use_quant_conv", "use_post_quant_conv")


def family_factors(model: AutoencoderKL, preset: str, src: Path) -> AutoencoderKL:
    """A file from elsewhere takes its family's factors; the family must share its latent layout
    (a 16-channel FLUX file is not SD's family, whatever its widths)."""
    family = PRESETS[preset]
    differ = [k for k in FAMILY_LAYOUT if getattr(family, k) != getattr(model.config, k)]
    if differ:
        found = ", ".join(f"{k}={getattr(model.config, k)} (the family has {getattr(family, k)})" for k in differ)
        raise ConversionError(f"--preset {preset}: {src} is not of that family: {found}")
    model.config = model.config.replace(
        scaling_factor=family.scaling_factor, shift_factor=family.shift_factor, force_upcast=family.force_upcast
    )
    return model


def load_source(src: Path, preset: str | None) -> AutoencoderKL:
    try:
        model = load_any(src)
    except NotAnAutoencoder as exc:
        raise ConversionError(str(exc)) from exc
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConversionError(f"{src}: {exc}") from exc
    own_config = src.is_dir() or carries_factors(src)
    if preset is not None and own_config:
        raise ConversionError(f"--preset: {src} carries its own config (factors included); leave --preset out")
    if preset is not None:
        model = family_factors(model, preset, src)
    elif not own_config:
        _refuse_unknown_family(model, src)
    return model


DEFAULT_FAMILY = "sd-f8c4"  # what a foreign file without --preset is taken for (its config's defaults)


def _refuse_unknown_family(model: AutoencoderKL, src: Path) -> None:
    """A foreign file of another layout than SD's would silently get SD's factors (0.18215, no
    shift): a FLUX or SD3 ae.safetensors needs its own, and both look alike (16 channels, no quant
    convs), so the user names the family."""
    sd = PRESETS[DEFAULT_FAMILY]
    if all(getattr(sd, k) == getattr(model.config, k) for k in FAMILY_LAYOUT):
        return
    layout = {k: getattr(model.config, k) for k in FAMILY_LAYOUT}
    candidates = [n for n, p in PRESETS.items() if all(getattr(p, k) == v for k, v in layout.items())]
    found = ", ".join(f"{k}={v}" for k, v in layout.items())
    raise ConversionError(
        f"{src} carries no scaling/shift factors and is not of SD's layout ({found}): pass --preset "
        f"with its family ({' or '.join(candidates) or 'none of the presets matches'}), which decides its factors"
    )


def convert(
    src: str | Path, dst: str | Path, dtype: str = "fp32", preset: str | None = None, overwrite: bool = False
) -> Converted:
    """Convert `src` into `dst`; the layout follows `dst` (a .safetensors name: a single file)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConversionError(f"{src}: no such model folder or file")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; pass --overwrite to replace it")
    layout = _target_layout(dst)
    model = load_source(src, preset)
    check_dtype(model, dtype)
    if layout == "single file":
        save_ldm(model, dst, dtype=dtype, source={"converted_from": str(src)})
    else:
        if dtype != "fp32":
            model = model.to(DTYPES[dtype])
        save_diffusers(model, dst)
    c = model.config
    return Converted(str(src), str(dst), layout, dtype, c.scaling_factor, c.shift_factor)


def as_json(result: Converted) -> str:
    return json.dumps(result.__dict__, indent=2)
