"""Raw image folder -> validated, resized, cropped sharded cache (the prepare stage's work)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from sdvae.data.images import SkippedImage, center_crop, load_rgb, resize_short_side
from sdvae.data.shards import write_cache
from sdvae.data.sources import IMAGE_SUFFIXES


class NoUsableImagesError(RuntimeError):
    """Every file of a split was skipped."""


@dataclass(frozen=True)
class PrepareSpec:
    mode: Literal["train", "eval"]
    resolution: int
    min_size: int
    max_pixels: int
    shard_size: int
    crops_per_image: int = 1
    short_side: tuple[int, int] = (0, 0)
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _image_rng(seed: int, name: str) -> np.random.Generator:
    """Per-image generator: crops depend on (seed, file name), not on processing order."""
    return np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)])


def random_crops(img: np.ndarray, spec: PrepareSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """`crops_per_image` crops at random scale: short side drawn from the range, then a random window."""
    lo, hi = spec.short_side
    base = resize_short_side(img, hi) if min(img.shape[:2]) > hi else img  # one big downscale, then cheap ones
    crops = []
    for _ in range(spec.crops_per_image):
        short = int(rng.integers(lo, hi + 1))
        scaled = resize_short_side(base, short)
        h, w = scaled.shape[:2]
        top = int(rng.integers(0, h - spec.resolution + 1))
        left = int(rng.integers(0, w - spec.resolution + 1))
        crops.append(np.ascontiguousarray(scaled[top : top + spec.resolution, left : left + spec.resolution]))
    return crops


def prepare_split(raw: Path, out: Path, spec: PrepareSpec) -> dict:
    """Build the cache for one split; every skipped file is recorded with its reason."""
    source_info = json.loads((raw / "source.json").read_text()) if (raw / "source.json").is_file() else {}
    folder = raw / "images" if (raw / "images").is_dir() else raw
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    skipped: list[dict[str, str]] = []
    originals = []
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    with write_cache(out, spec.shard_size, spec.resolution) as writer:
        for path in tqdm(files, desc=f"prepare {spec.mode}", unit="img"):
            name = str(path.relative_to(folder))
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                reason = f"unsupported extension {path.suffix!r}"
                skipped.append({"file": name, "reason": reason})
                print(f"warning: skipped {name}: {reason}", file=sys.stderr)
                continue
            try:
                img = load_rgb(path, spec.min_size, spec.max_pixels)
            except SkippedImage as exc:
                skipped.append({"file": name, "reason": str(exc)})
                print(f"warning: skipped {name}: {exc}", file=sys.stderr)
                continue
            first = writer.count
            if spec.mode == "eval":
                writer.add(np.ascontiguousarray(center_crop(resize_short_side(img, spec.resolution), spec.resolution)))
            else:
                for crop in random_crops(img, spec, _image_rng(spec.seed, name)):
                    writer.add(crop)
            originals.append(
                {
                    "file": name,
                    "height": img.shape[0],
                    "width": img.shape[1],
                    "first": first,
                    "count": writer.count - first,
                }
            )
        if not originals:
            raise NoUsableImagesError(
                f"{folder}: no usable image among {len(files)} files; skipped: "
                + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:10])
            )
        writer.manifest = {  # type: ignore[attr-defined]
            "split": spec.mode,
            "params_hash": spec.digest(),
            "spec": spec.__dict__,
            "source": source_info.get("source"),
            "source_fingerprint": source_info.get("fingerprint"),
            "images": originals,
            "skipped": skipped,
        }
    return json.loads((out / "manifest.json").read_text())
