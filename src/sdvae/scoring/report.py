"""What a scoring run shows: a markdown table, a labelled grid, the JSON, and flat metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sdvae.imagefiles import save_rows
from sdvae.io import write_json

HEADLINE = ("psnr", "ssim_gaussian", "ssim_uniform", "lpips")
LOWER_IS_BETTER = ("lpips", "rfid", "kid")


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per model: mean ± std of the per-image metrics, rFID (flagged below 2048 images), KID."""
    lines = [
        "| model | PSNR | SSIM (Gaussian) | SSIM (uniform 7x7) | LPIPS | rFID | KID x1000 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in result["models"].items():
        cells = [f"{_cell(m[k]['mean'], 4 if k != 'psnr' else 2)} ± {_cell(m[k]['std'], 3)}" for k in HEADLINE]
        rfid = m["rfid"]
        fid = _cell(rfid["value"], 2) + ("" if rfid["reliable"] else f" (N={rfid['n']}, unreliable)")
        kid = m["kid"]
        kid_cell = "n/a" if kid["mean"] is None else f"{1000 * kid['mean']:.2f} ± {1000 * kid['std']:.2f}"
        lines.append(f"| {label} | " + " | ".join([*cells, fid, kid_cell]) + " |")
    lines.extend(_latent_table(result))
    lines.append(
        f"\n{result['images']} images at {result['protocol']['resolution']} px from {result['protocol']['source']}, "
        f"{len(result['skipped'])} skipped; {result['images_per_s']} images/s on {result['device']} "
        f"(processes: {result['processes']})"
    )
    return "\n".join(lines)


def _latent_table(result: dict[str, Any]) -> list[str]:
    """Diffusability, one row per model that has it (docs/evaluation.md)."""
    rows = []
    for label, m in result["models"].items():
        latent = m.get("latent")
        if not latent:
            continue
        if "skipped" in latent:
            rows.append(f"| {label} | skipped: {latent['skipped']} |" + " |" * 5)
            continue
        flat = latent_metrics(latent)
        ifid = latent["ifid"]
        ifid_cell = _cell(ifid["value"], 2) + ("" if ifid["reliable"] else f" (N={ifid['n']}, unreliable)")
        cells = [
            _cell(flat.get("latent_scale_psnr"), 2),
            _cell(flat.get("latent_scale_lpips"), 4),
            _cell(flat.get("latent_rotation_psnr"), 2),
            _cell(flat.get("latent_hf_share"), 3),
            _cell(flat.get("rgb_hf_share"), 3),
            ifid_cell,
        ]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = [
        "\n| model | scale-eq. PSNR | scale-eq. LPIPS | rot90-eq. PSNR | latent HF share | RGB HF share | iFID |",
        "|---|---|---|---|---|---|---|",
    ]
    return head + rows


def latent_metrics(latent: dict[str, Any] | None) -> dict[str, float]:
    """Scalars of the `latent` (diffusability) section, for the table, MLflow and DVC."""
    if not latent or "skipped" in latent:
        return {}
    spectrum = latent["spectrum"]
    values = {
        "latent_scale_psnr": latent["scale_equivariance"]["psnr"]["mean"],
        "latent_scale_lpips": latent["scale_equivariance"]["lpips"]["mean"],
        "latent_rotation_psnr": latent["rotation_equivariance"]["psnr"]["mean"],
        "latent_hf_share": spectrum["latent_high_frequency_share"]["mean"],
        "rgb_hf_share": spectrum["rgb_high_frequency_share"]["mean"],
        "ifid": latent["ifid"]["value"],
    }
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def flat_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """Scalars for MLflow / DVC: psnr, ssim_gaussian, ssim_uniform, lpips (means), their stds, rfid,
    kid, and the diffusability figures (`latent_metrics`)."""
    out: dict[str, float] = {}
    for key in HEADLINE:
        if entry[key]["mean"] is not None:
            out[key] = entry[key]["mean"]
            out[f"{key}_std"] = entry[key]["std"]
    if entry["rfid"]["value"] is not None:
        out["rfid"] = entry["rfid"]["value"]
    if entry["kid"]["mean"] is not None:
        out["kid"] = entry["kid"]["mean"]
    out.update(latent_metrics(entry.get("latent")))
    return out


def better_than(model: dict[str, float], baseline: dict[str, float]) -> dict[str, bool | None]:
    """Per headline metric: does `model` beat `baseline` (None where either is undefined)."""
    flags: dict[str, bool | None] = {}
    for key in (*HEADLINE, "rfid", "kid"):
        a, b = model.get(key), baseline.get(key)
        flags[key] = None if a is None or b is None else (a < b if key in LOWER_IS_BETTER else a > b)
    return flags


def save_grid(result: dict[str, Any], path: str | Path) -> Path | None:
    """Originals on top, then one labelled row per model."""
    rows = result.get("grid") or []
    if not rows:
        return None
    labels = ["input", *result["models"]]
    to_range = [r.float().div(127.5).sub(1.0) for r in rows]
    caption = f"{result['images']} images at {result['protocol']['resolution']} px | " + " | ".join(
        f"{_short(label, 20)}: PSNR {m['psnr']['mean']:.2f} LPIPS {m['lpips']['mean']:.3f}"
        for label, m in result["models"].items()
    )
    return save_rows(to_range, Path(path), labels=[_short(label) for label in labels], caption=caption)


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3) :]


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """The JSON, without the grid's tensors."""
    write_json(path, {k: v for k, v in result.items() if k != "grid"})
    return Path(path)
