"""Model file formats: diffusers folders and CompVis/LDM checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdvae.formats.diffusers import load_diffusers, save_diffusers
from sdvae.formats.ldm import load_ldm, save_ldm
from sdvae.models.autoencoder_kl import AutoencoderKL, register_model_files


def load_any(path: str | Path, **kwargs: Any) -> AutoencoderKL:
    """A diffusers folder, or an LDM checkpoint file (.ckpt/.pt/.pth/.safetensors)."""
    p = Path(path)
    if p.is_dir():
        return load_diffusers(p, **kwargs)
    if p.is_file():
        return load_ldm(p, **kwargs)
    raise FileNotFoundError(f"{p}: no such model folder or checkpoint")


class _Files:
    """`AutoencoderKL.from_pretrained` / `save_pretrained` read and write through these."""

    def load(self, path: Path) -> AutoencoderKL:
        return load_any(path)

    def save(self, model: AutoencoderKL, path: Path) -> Path:
        return save_diffusers(model, path)


register_model_files(_Files())

__all__ = ["load_any", "load_diffusers", "load_ldm", "save_diffusers", "save_ldm"]
