"""The sharded image cache: uint8 NHWC `.npy` shards + `manifest.json`.

Shards are memory-mapped when read: no decode, no copy until a batch touches them, shared
between DataLoader workers by the page cache. The whole cache directory is written under a
temporary name and renamed at the end, so a killed prepare leaves no half cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sdvae.io import atomic_dir

MANIFEST = "manifest.json"
FORMAT = "sdvae-npy-shards/1"


class ShardWriter:
    """Buffers images of one size and flushes them as fixed-size shards."""

    def __init__(self, root: Path, shard_size: int, resolution: int) -> None:
        self.root, self.shard_size, self.resolution = root, shard_size, resolution
        self.buffer: list[np.ndarray] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, img: np.ndarray) -> None:
        if img.shape != (self.resolution, self.resolution, 3) or img.dtype != np.uint8:
            raise ValueError(
                f"cache image must be uint8 {self.resolution}x{self.resolution}x3, got {img.dtype} {img.shape}"
            )
        self.buffer.append(img)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"shard-{len(self.shards):05d}.npy"
        np.save(self.root / name, np.stack(self.buffer))
        self.shards.append({"file": name, "count": len(self.buffer)})
        self.buffer = []

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards) + len(self.buffer)


@contextmanager
def write_cache(target: Path, shard_size: int, resolution: int) -> Iterator[ShardWriter]:
    """Yields a writer into a temp dir; the caller sets `writer.manifest` before leaving."""
    with atomic_dir(target) as tmp:
        writer = ShardWriter(tmp, shard_size, resolution)
        yield writer
        writer.flush()
        manifest = {
            "format": FORMAT,
            "resolution": resolution,
            "count": writer.count,
            "shards": writer.shards,
            **getattr(writer, "manifest", {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class ShardReader:
    """Random access to cached images, memory-mapped."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no {MANIFEST}; run the prepare stage (dvc repro prepare)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self._arrays: list[np.ndarray] | None = None
        counts = [s["count"] for s in self.manifest["shards"]]
        self._offsets = np.cumsum([0, *counts])

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:  # opened lazily, so each DataLoader worker maps its own
            self._arrays = [np.load(self.root / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        return self._arrays

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.arrays[shard][index - self._offsets[shard]]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # never pickle memory maps into worker processes
        return state
