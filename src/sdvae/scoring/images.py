"""Images to score, from any source, streamed: decoded and viewed in loader workers.

A source is every `data.*_source` form (`folder:`, `hf:name[:split]`, `builtin:*`) or a prepared
eval cache (a folder with `manifest.json`). Only names (paths or row numbers) are listed up
front; bytes are read and decoded one image at a time in the workers, so memory stays constant
at any set size. A file that cannot be used comes back as a skip with its reason, never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sdvae.data.common import SourceError
from sdvae.data.images import SkippedImage, center_crop, load_rgb, resize_short_side
from sdvae.data.sources import download_split, image_files, parse_source
from sdvae.io import atomic_dir


@dataclass
class FolderReader:
    root: Path
    names: list[str]

    def __call__(self, index: int) -> tuple[str, bytes]:
        return self.names[index], (self.root / self.names[index]).read_bytes()


@dataclass
class HFReader:
    dataset: str
    image_column: str
    names: list[str]
    _ds: Any = field(default=None, repr=False)

    def __call__(self, index: int) -> bytes:
        if self._ds is None:
            from sdvae.data.hf import open_dataset

            self._ds = open_dataset(self.dataset, self.image_column)
        cell = self._ds[index][self.image_column]
        return self.names[index], cell.get("bytes") or Path(cell["path"]).read_bytes()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}  # each worker opens the memory-mapped dataset itself


@dataclass
class CacheReader:
    root: Path
    names: list[str]
    _ds: Any = field(default=None, repr=False)

    def __call__(self, index: int) -> tuple[str, bytes]:
        if self._ds is None:
            from litdata import StreamingDataset

            self._ds = StreamingDataset(str(self.root.resolve()), shuffle=False, drop_last=False)
        sample = self._ds[index]
        return str(sample["name"]), sample["image"]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}


Reader = FolderReader | HFReader | CacheReader


def _builtin_folder(spec: str, cache_dir: Path) -> Path:
    """A built-in set, materialised once under the cache directory (written atomically)."""
    out = cache_dir / "sources" / spec.replace(":", "_")
    if not (out / "source.json").is_file():
        with atomic_dir(out) as tmp:
            download_split(spec, tmp, image_column="image", download_cache=cache_dir / "downloads")
    return out / "images"


def open_source(spec: str, cache_dir: Path, image_column: str = "image", max_images: int = 0) -> Reader:
    """A reader of `spec`'s images by position; raises SourceError with what is wrong."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        reader: Reader = CacheReader(path, [f"#{i}" for i in range(int(manifest["count"]))])  # named when read
    else:
        kind, rest = parse_source(spec)
        if kind == "hf":
            from sdvae.data.hf import open_dataset

            rows = len(open_dataset(rest, image_column))
            reader = HFReader(rest, image_column, [f"row-{i:08d}" for i in range(rows)])
        else:
            root = Path(rest).expanduser() if kind == "folder" else _builtin_folder(spec, cache_dir)
            reader = FolderReader(root, [str(p.relative_to(root)) for p in image_files(root)])
    if max_images:
        reader.names = reader.names[:max_images]
    if not reader.names:
        raise SourceError(f"source {spec!r} has no images")
    return reader


def view(data: bytes, resolution: int, min_size: int, max_pixels: int) -> np.ndarray:
    """The scored view: short side to `resolution`, center crop; raises SkippedImage."""
    return center_crop(resize_short_side(load_rgb(data, min_size, max_pixels), resolution), resolution)


class ScoringImages(Dataset):
    """Item k: {"index", "name", "image" (uint8 CHW) or None, "reason"} of `indices[k]`."""

    def __init__(
        self, reader: Reader, indices: list[int], resolution: int, min_size: int = 16, max_pixels: int = 200_000_000
    ) -> None:
        self.reader, self.indices = reader, indices
        self.resolution, self.min_size, self.max_pixels = resolution, min_size, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        item: dict[str, Any] = {"index": index, "name": self.reader.names[index], "image": None, "reason": None}
        try:
            item["name"], data = self.reader(index)
            arr = view(data, self.resolution, self.min_size, self.max_pixels)
            item["image"] = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable copy
        except SkippedImage as exc:
            item["reason"] = str(exc)
        except OSError as exc:  # unreadable file, vanished row
            item["reason"] = f"unreadable: {exc}"
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Good images stacked (uint8 NCHW) with their indices and names; skips listed with reasons."""
    good = [it for it in items if it["image"] is not None]
    return {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "names": [it["name"] for it in good],
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "skipped": [{"name": it["name"], "reason": it["reason"]} for it in items if it["image"] is None],
    }


def shard(count: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s positions: every `world`-th, no padding, so no image is scored twice."""
    return list(range(rank, count, world))
