"""The model card shipped with every export: what it is, what it saw, how good it is, how to load it."""

from __future__ import annotations

import json
from typing import Any

from sdvae.models.autoencoder_kl import AutoencoderKL, count_parameters


def _table(scores: dict[str, Any]) -> str:
    keys = ("psnr", "ssim_gaussian", "ssim_uniform", "lpips", "rfid", "kid")
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("model", "baseline"):
        row = scores.get(name, {})
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[k]:.4f}" if isinstance(row.get(k), float) else "n/a" for k in keys)
            + " |"
        )
    return "\n".join(lines)


def _before(cfg: Any, stats: dict[str, Any]) -> str:
    old = stats.get("factors_before")
    if not old:
        return "the factors before this export are not recorded."
    source = old.get("from") or "the preset"
    same = (old["scaling_factor"], old["shift_factor"]) == (cfg.scaling_factor, cfg.shift_factor)
    if source.startswith("preset"):
        if same:
            return f"the {source}'s own."
        scale, shift = old["scaling_factor"], old["shift_factor"]
        return f"replacing the {source}'s scaling_factor {scale:.6g}, shift_factor {shift}."
    if same:
        return f"unchanged from the model training started from ({source})."
    return (
        f"the model training started from ({source}) had scaling_factor {old['scaling_factor']:.6g}, "
        f"shift_factor {old['shift_factor']}: a diffusion model trained on its latents needs those, or retraining."
    )


def _fp16_line(fp16: dict[str, Any] | None) -> str:
    if not fp16:
        return "fp16 decoding not checked."
    peak = f"largest decoder activation {fp16['max_abs_activation']:.4g} at {fp16['max_abs_activation_at']}"
    if fp16["overflows_fp16"]:
        return f"**decoding in fp16 overflows** ({peak}; fp16 ends at 65504): keep the VAE in fp32 or bf16."
    return f"an fp16 decode stays finite ({peak}; max abs error {fp16['fp16_max_abs_error']:.3g} vs fp32)."


def _sources_table(sources: dict[str, Any]) -> str:
    lines = ["| split | source | images |", "|---|---|---|"]
    for split, info in sources.items():
        count = info.get("count", info.get("images", "?")) if isinstance(info, dict) else "?"
        name = info.get("source", "?") if isinstance(info, dict) else info
        lines.append(f"| {split} | `{name}` | {count} |")
    return "\n".join(lines)


def _single_file_section(name: str | None, cfg: Any) -> str:
    if not name:
        return ""
    shift = f"; shift_factor {cfg.shift_factor}" if cfg.shift_factor is not None else ""
    return f"""
## Use as one file (A1111, Forge, ComfyUI, InvokeAI)
`{name}` holds the same weights in the CompVis/LDM key layout those programs load.

| program | put the file in |
|---|---|
| AUTOMATIC1111 / Forge | `models/VAE/`, then pick it under Settings > VAE |
| ComfyUI | `models/vae/`, then a Load VAE node |
| InvokeAI | Model Manager > Add model, or its `models/` folder (type VAE) |

A diffusion model trained on these latents needs scaling_factor {cfg.scaling_factor:.6g}{shift}
(its header carries the whole config: `sdvae convert {name} FOLDER` turns it back into this folder).
"""


def render_model_card(
    model: AutoencoderKL,
    *,
    single_file: str | None = None,
    params: dict[str, Any],
    sources: dict[str, Any],
    licenses: list[str],
    scores: dict[str, Any],
    stats: dict[str, Any],
    fp16: dict[str, Any] | None = None,
    run_id: str | None,
    run_tags: dict[str, str] | None = None,
) -> str:
    cfg = model.config
    return f"""---
library_name: diffusers
tags: [autoencoder, vae, stable-diffusion, sdvae]
---
# sdvae AutoencoderKL

A KL-regularised autoencoder (the first stage of latent diffusion) trained as a VAE-GAN with sdvae.

## Architecture
- block_out_channels {list(cfg.block_out_channels)}, layers_per_block {cfg.layers_per_block},
  latent_channels {cfg.latent_channels}, norm_num_groups {cfg.norm_num_groups},
  mid-block attention {cfg.mid_block_add_attention}; downsampling factor {model.downsample_factor}
- {count_parameters(model):,} parameters
- scaling_factor {cfg.scaling_factor:.6g}, shift_factor {cfg.shift_factor}
  ({stats.get("factor_source", "from the preset")}); {_before(cfg, stats)}
  measured on {stats.get("images", "?")} training crops: 1/std {stats.get("scaling_factor", "n/a")},
  mean {stats.get("shift_factor", "n/a")},
  per-channel mean {[round(v, 4) for v in stats.get("channel_mean", [])]},
  std {[round(v, 4) for v in stats.get("channel_std", [])]}
- force_upcast {cfg.force_upcast}; {_fp16_line(fp16)}

## Training data
{_sources_table(sources)}

Licenses of the source images are in `licenses/`: {", ".join(licenses) or "none recorded"}.

## Evaluation
Held-out set: {scores.get("eval_images", "?")} images at {scores.get("resolution", "?")} px,
{scores.get("weights", "?")} weights.

{_table(scores)}

Per-image means (`sdvae evaluate`'s protocol: PSNR on [0, 1], SSIM with the Gaussian and the
uniform 7x7 window, LPIPS-VGG, on 8-bit reconstructions). The baseline is bicubic downscaling to
as many values as the latent holds, then bicubic upscaling. rFID below 2048 images is strongly
biased: compare runs on the same set only; KID is unbiased at small N.

## Use with diffusers
```python
import torch
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("path/to/this/folder")
x = torch.rand(1, 3, 256, 256) * 2 - 1                      # images in [-1, 1]
shift = vae.config.shift_factor or 0.0                       # SD3 / FLUX shift; None for SD / SDXL
latents = (vae.encode(x).latent_dist.sample() - shift) * vae.config.scaling_factor
recon = vae.decode(latents / vae.config.scaling_factor + shift).sample
```
{_single_file_section(single_file, cfg)}
## Training parameters
MLflow run: {run_id or "n/a"}; DVC experiment: {(run_tags or {}).get("dvc.exp_name", "none (dvc repro)")},
baseline revision {(run_tags or {}).get("dvc.baseline_rev", "n/a")}

```json
{json.dumps(params, indent=2)}
```
"""
