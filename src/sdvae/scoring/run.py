"""Score several VAEs (and bicubic) on one image set in one pass, on one or many devices.

Each batch is decoded once, its originals go through Inception once, then every model
reconstructs it and is scored on the same pixels. `devices > 1` runs Lightning Fabric's DDP:
rank r reads images r, r + N, r + 2N, ... (no padding, so none is counted twice), and every
metric is a sum that torchmetrics all-reduces, so N processes give the figures of one.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sdvae.config import WeightsConfig
from sdvae.metrics import build_lpips, inception_weights
from sdvae.pretrained import default_cache_dir
from sdvae.scoring.candidates import Candidate, Reconstructor, UnusableModel, load_candidate
from sdvae.scoring.diffusability import IFID_ALPHA, DiffusabilityMetrics
from sdvae.scoring.features import (
    FID_RELIABLE_FROM,
    FeatureStats,
    build_inception,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
)
from sdvae.scoring.images import ScoringImages, collate, open_source, shard
from sdvae.scoring.perceptual import ReferenceLPIPS
from sdvae.scoring.protocol import PROTOCOL, psnr_per_image, ssim_gaussian, ssim_uniform, to_uint8
from sdvae.scoring.stats import ChannelMoments, Moments

PRECISIONS = ("32", "bf16-mixed")


class NothingScored(RuntimeError):
    """No model could be loaded, or no image of the source could be used."""


@dataclass(frozen=True)
class ScoreOptions:
    resolution: int = 256
    max_images: int = 0  # 0 = all
    batch_size: int = 16
    devices: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu
    precision: str = "32"  # the VAE's autocast; metrics are always fp32 / fp64
    sample_seed: int | None = None  # None: posterior mode; else a seeded sample per image
    workers: int = 2  # loader processes decoding images
    min_size: int = 16
    image_column: str = "image"
    grid_images: int = 8
    kid_max_images: int = 5000
    progress: bool = True
    save_images: str | None = None  # folder for PNG dumps of inputs and reconstructions
    inception: bool = True  # False: no rFID / KID (a machine without the Inception weights)
    diffusability: bool = True  # the `latent` section: equivariance, spectrum, iFID
    ifid_max_images: int = 5000  # iFID's nearest-neighbour pool: the first images of the set
    ifid_alpha: float = IFID_ALPHA  # 0 decodes the latents themselves: iFID = rFID


@dataclass
class ModelMetrics:
    candidate: Candidate
    psnr: Moments = field(default_factory=Moments)
    ssim_gaussian: Moments = field(default_factory=Moments)
    ssim_uniform: Moments = field(default_factory=Moments)
    lpips: Moments = field(default_factory=Moments)
    features: FeatureStats = field(default_factory=FeatureStats)
    latents: ChannelMoments | None = None
    diffusability: DiffusabilityMetrics | None = None
    diffusability_skipped: str | None = None

    def to(self, device: torch.device) -> ModelMetrics:
        for name in ("psnr", "ssim_gaussian", "ssim_uniform", "lpips", "features"):
            getattr(self, name).to(device)
        for part in (self.latents, self.diffusability):
            if part is not None:
                part.to(device)
        return self

    def latent_section(self, real_stats: dict[str, Any] | None, alpha: float) -> dict[str, Any] | None:
        if self.diffusability_skipped is not None:
            return {"skipped": self.diffusability_skipped}
        return None if self.diffusability is None else self.diffusability.compute(real_stats, alpha)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("sdvae", "torch", "torchmetrics", "torch-fidelity", "lpips", "pillow", "numpy", "scipy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _load(models: list[tuple[str, str]]) -> tuple[list[Candidate], list[dict[str, str]]]:
    loaded, failed = [], []
    for label, spec in models:
        try:
            loaded.append(load_candidate(spec, label))
        except UnusableModel as exc:
            failed.append({"model": label, "error": str(exc)})
    return loaded, failed


def _bicubic_shape(candidates: list[Candidate]) -> tuple[int, int]:
    """Bicubic keeps as many values as the first model's latent (f8c4 when there is none)."""
    for c in candidates:
        if c.model is not None:
            return c.model.downsample_factor, c.model.config.latent_channels
    return 8, 4


def _gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def score_models(
    models: list[tuple[str, str]],
    source: str,
    options: ScoreOptions,
    weights: WeightsConfig | None = None,
    fabric: Any = None,
) -> dict[str, Any] | None:
    """The result JSON on rank 0 (None on other ranks); `models` is [(label, spec)]."""
    from lightning.fabric import Fabric

    if options.precision not in PRECISIONS:
        raise ValueError(f"precision {options.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if fabric is None:
        strategy = "ddp" if options.devices > 1 else "auto"
        fabric = Fabric(accelerator=options.accelerator, devices=options.devices, strategy=strategy)
        fabric.launch()
    rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
    weights = weights or WeightsConfig()
    candidates, failed = _load(models)
    if not candidates:
        raise NothingScored("no model could be loaded: " + "; ".join(f["error"] for f in failed))
    cache_dir = default_cache_dir(weights.cache_dir)
    if rank == 0:  # built-in sets are materialised once, by one process
        reader = open_source(source, cache_dir, options.image_column, options.max_images)
    fabric.barrier()
    if rank != 0:
        reader = open_source(source, cache_dir, options.image_column, options.max_images)
    count = len(reader.names)
    dataset = ScoringImages(reader, shard(count, rank, world), options.resolution, options.min_size)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers, collate_fn=collate)

    perceptual = ReferenceLPIPS(build_lpips(weights).to(device))
    inception = build_inception(inception_weights(weights)).to(device) if options.inception else None
    bicubic = _bicubic_shape(candidates)
    real = FeatureStats(options.kid_max_images).to(device)
    scored = []
    for c in candidates:
        metrics = ModelMetrics(c, features=FeatureStats(options.kid_max_images))
        if c.model is not None:
            c.model.to(device)
            metrics.latents = ChannelMoments(c.model.config.latent_channels)
        factor = c.model.downsample_factor if c.model is not None else 1
        if options.diffusability and options.resolution % factor:  # decided alike on every rank
            metrics.diffusability_skipped = f"resolution {options.resolution} is not a multiple of {factor}"
        elif options.diffusability:
            metrics.diffusability = DiffusabilityMetrics(options.kid_max_images, options.ifid_max_images)
        scored.append((Reconstructor(c, bicubic, options.sample_seed), metrics.to(device)))

    skipped: list[dict[str, str]] = []
    grid: list[list[torch.Tensor]] = [[] for _ in range(1 + len(scored))]
    shown = 0
    image_size: tuple[int, int] | None = None
    lpips_pair = lambda a, b: perceptual.net(a, b).flatten()  # noqa: E731
    save = Path(options.save_images) if options.save_images else None
    bar = tqdm(total=len(dataset), unit="img", desc="evaluate", disable=not options.progress or rank != 0)
    start = time.perf_counter()
    for batch in loader:
        skipped.extend(batch["skipped"])
        bar.update(len(batch["skipped"]))
        if batch["images"] is None:
            continue
        x8, index = batch["images"].to(device), batch["index"].to(device)
        x = x8.float().div(127.5).sub(1.0)
        image_size = (x.shape[-2], x.shape[-1])
        if inception is not None:
            real.update(inception_features(inception, x8), index)
        perceptual.set_reference(x)
        rows = [x8]
        for reconstruct, m in scored:
            rec, z = reconstruct(x, index, options.precision)
            rec8 = to_uint8(rec)
            with torch.autocast(device.type, enabled=False):
                m.psnr.update(psnr_per_image(x8, rec8))
                m.ssim_gaussian.update(ssim_gaussian(x8, rec8))
                m.ssim_uniform.update(ssim_uniform(x8, rec8))
                m.lpips.update(perceptual.distances(rec8.float().div(127.5).sub(1.0)))
            if inception is not None:
                m.features.update(inception_features(inception, rec8), index)
            if m.latents is not None:
                m.latents.update(z)
            if m.diffusability is not None:  # images are resolution x resolution: latent and image line up
                m.diffusability.update(
                    x, z, index, partial(reconstruct.decode, precision=options.precision), lpips_pair
                )
            rows.append(rec8)
        if save is not None:
            _save_pngs(save, batch["names"], index, rows, [m.candidate.label for _, m in scored])
        if shown < options.grid_images:
            take = options.grid_images - shown
            for row, images in zip(grid, rows, strict=True):
                row.append(images[:take].cpu())
            shown += min(take, x8.shape[0])
        bar.update(x8.shape[0])
    bar.close()
    for reconstruct, m in scored:  # iFID: every rank needs every rank's latents for the neighbours
        if m.diffusability is not None and inception is not None:  # the same on every rank
            everyone = _gather_objects((m.diffusability.latents, m.diffusability.index), world)
            decode = partial(reconstruct.decode, precision=options.precision)
            size = image_size or (options.resolution, options.resolution)
            m.diffusability.interpolate(
                everyone, decode, size, inception, options.batch_size, device, options.ifid_alpha
            )
    seconds = time.perf_counter() - start
    all_skipped = [s for part in _gather_objects(skipped, world) for s in part]

    real_stats = real.compute() if inception is not None else None
    n_real = int(scored[0][1].psnr.compute()["n"])  # every model scores the same images
    results: dict[str, Any] = {}
    for _, m in scored:
        entry: dict[str, Any] = {
            "psnr": m.psnr.compute(),
            "ssim_gaussian": m.ssim_gaussian.compute(),
            "ssim_uniform": m.ssim_uniform.compute(),
            "lpips": m.lpips.compute(),
        }
        if real_stats is not None:
            fake_stats = m.features.compute()
            fid = frechet_distance(real_stats, fake_stats)
            entry["rfid"] = {"value": fid, "n": n_real, "reliable": n_real >= FID_RELIABLE_FROM}
            entry["kid"] = kernel_inception_distance(real_stats["kid_features"].cpu(), fake_stats["kid_features"].cpu())
        else:
            entry["rfid"] = {"value": None, "n": n_real, "reliable": False}
            entry["kid"] = {"mean": None, "std": None, "subset_size": 0, "subsets": 0}
        entry["latents"] = m.latents.compute() if m.latents is not None else None
        entry["latent"] = m.latent_section(real_stats, options.ifid_alpha)
        entry["sha256"] = m.candidate.sha256
        entry["source"] = m.candidate.source
        results[m.candidate.label] = entry
    if rank != 0:
        return None
    if n_real == 0:
        raise NothingScored(
            f"no image of {source!r} could be used: "
            + "; ".join(f"{s['name']}: {s['reason']}" for s in all_skipped[:5])
        )
    return {
        "protocol": {
            **PROTOCOL,
            **{k: v for k, v in asdict(options).items() if k not in ("progress", "save_images")},
            "source": source,
            "bicubic_values_of": f"f{bicubic[0]}c{bicubic[1]} latent",
        },
        "versions": versions(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "processes": world,
        "images": n_real,
        "seconds": round(seconds, 2),
        "images_per_s": round(n_real / seconds, 3) if seconds > 0 else None,
        "models": results,
        "failed_models": failed,
        "skipped": all_skipped,
        "grid": [torch.cat(r) for r in grid] if shown else [],
    }


def _save_pngs(root: Path, names: list[str], index: torch.Tensor, rows: list[torch.Tensor], labels: list[str]) -> None:
    from PIL import Image

    from sdvae.io import atomic_path

    folders = ["originals", *(_slug(label) for label in labels)]
    for folder, images in zip(folders, rows, strict=True):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name, img in zip(index.tolist(), names, images.cpu(), strict=True):
            stem = Path(name).stem.replace("/", "__")[:80]
            with atomic_path(root / folder / f"{i:07d}_{stem}.png") as tmp:
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label.strip("/"))[-80:] or "model"
