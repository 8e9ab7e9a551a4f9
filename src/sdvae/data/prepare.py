"""Raw images -> a litdata cache (the prepare stage's work), written by parallel workers.

Each worker decodes and validates its share of the files (`sdvae.data.encoding`) and hands
litdata encoded bytes; litdata packs them into a few large chunk files plus `index.json`. A file
that cannot be used is skipped with its reason: workers write the reason beside the output, and
the manifest (`manifest.json`, next to litdata's index) lists every image kept and every file
skipped. The whole cache is written under a temporary name and renamed at the end, so a killed
prepare leaves no half cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdvae.data.encoding import eval_bytes, train_bytes
from sdvae.data.hf import RowReader
from sdvae.data.images import SkippedImage
from sdvae.data.sources import IMAGE_SUFFIXES
from sdvae.io import atomic_dir

MANIFEST = "manifest.json"
FORMAT = "sdvae-litdata/1"


class NoUsableImagesError(RuntimeError):
    """Every file of a split was skipped."""


@dataclass(frozen=True)
class PrepareSpec:
    mode: Literal["train", "eval"]
    resolution: int  # eval: the stored crop; train: recorded (crops are drawn at load time)
    min_size: int
    max_pixels: int
    max_short_side: int = 512  # train: stored images are downscaled to this short side
    jpeg_quality: int = 95
    samples_per_image: int = 1  # train: entries per image per epoch (tiny sets need more than one)
    chunk_mb: int = 64
    num_workers: int = 1

    def digest(self) -> str:
        """What the cached bytes depend on (not how many workers wrote them)."""
        relevant = {k: v for k, v in self.__dict__.items() if k != "num_workers"}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _note(reasons: str, record: dict[str, Any]) -> None:
    """Append one record to this worker's own log (one file per process: no locking needed)."""
    with open(Path(reasons) / f"{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class FolderReader:
    """File name -> its bytes; files whose extension is not an image's are skipped with a reason."""

    folder: str

    @property
    def names(self) -> list[str]:
        root = Path(self.folder)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))

    def __call__(self, name: str) -> bytes:
        path = Path(self.folder) / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SkippedImage(f"unsupported extension {path.suffix!r}")
        return path.read_bytes()


def _prepare_one(name: str, *, read: Callable[[str], bytes | None], reasons: str, spec: PrepareSpec) -> Any:
    """Runs in a litdata worker: one input -> its cache entries, or none (a reason written to `reasons`)."""
    try:
        raw = read(name)
        if raw is None:  # an hf: row that belongs to the other split
            _note(reasons, {"file": name, "other_split": True})
            return
        if spec.mode == "eval":
            data, h, w, how = eval_bytes(raw, spec.min_size, spec.max_pixels, spec.resolution)
        else:
            data, h, w, how = train_bytes(raw, spec.min_size, spec.max_pixels, spec.max_short_side, spec.jpeg_quality)
    except SkippedImage as exc:
        _note(reasons, {"file": name, "reason": str(exc)})
        print(f"warning: skipped {name}: {exc}", file=sys.stderr)
        return
    copies = spec.samples_per_image if spec.mode == "train" else 1
    for copy in range(copies):
        yield {"name": name, "copy": copy, "image": data, "height": h, "width": w, "stored": how}


def _remote_index(remote: str, scratch: Path) -> dict[str, Any]:
    """litdata's index.json of a remote dataset, fetched with litdata's own client."""
    from litdata.streaming.downloader import get_downloader

    local = scratch / "index.json"
    get_downloader(remote, str(scratch), []).download_file(f"{remote}/index.json", str(local))
    index = json.loads(local.read_text())
    local.unlink()
    return index


def prepare_split(raw: Path, out: Path, spec: PrepareSpec, remote: str | None = None) -> dict:
    """Build the cache for one split; every skipped file is recorded with its reason.

    With `remote` (an `s3://`, `gs://`, `azure://` or `r2://` prefix) litdata writes the chunks
    there and `out` holds only the manifest, which points at them: the small file DVC tracks,
    and what every node of a multi-node job reads to stream the same data. Each prepare writes
    a new version under `remote` and the pointer moves only when it is complete, so a killed
    prepare never damages the data an existing pointer names (old versions stay until deleted).
    """
    from litdata import optimize

    if remote is not None:
        remote = f"{remote.rstrip('/')}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"

    source_info = json.loads((raw / "source.json").read_text()) if (raw / "source.json").is_file() else {}
    folder = raw / "images" if (raw / "images").is_dir() else raw
    hf = source_info.get("kind") == "hf"
    read: FolderReader | RowReader = RowReader(source_info) if hf else FolderReader(str(folder.resolve()))
    files = read.names
    if not files:
        raise NoUsableImagesError(f"{folder}: no files")
    with atomic_dir(out) as tmp:
        reasons = tmp.parent / f".{out.name}.tmp-reasons-{os.getpid()}"  # cleaned like any stale temp
        shutil.rmtree(reasons, ignore_errors=True)
        reasons.mkdir()
        try:
            fn = functools.partial(_prepare_one, read=read, reasons=str(reasons), spec=spec)
            optimize(
                fn=fn,
                inputs=files,
                output_dir=remote or str(tmp.resolve()),
                chunk_bytes=f"{spec.chunk_mb}MB",
                num_workers=max(1, min(spec.num_workers, len(files))),
                reorder_files=False,
                keep_data_ordered=True,  # static slice per worker: the same inputs give the same chunks
                mode="overwrite",
                verbose=True,
                start_method="fork" if sys.platform == "linux" else None,
            )
            notes = [json.loads(line) for p in reasons.iterdir() for line in p.read_text().splitlines()]
        finally:
            shutil.rmtree(reasons, ignore_errors=True)
        if remote is not None:
            index = _remote_index(remote, reasons.parent)
        else:
            index = json.loads((tmp / "index.json").read_text()) if (tmp / "index.json").is_file() else {"chunks": []}
        skipped = sorted((n for n in notes if "reason" in n), key=lambda s: s["file"])
        kept = sorted(set(files) - {n["file"] for n in notes})
        if not index["chunks"]:
            raise NoUsableImagesError(
                f"{folder}: no usable image among {len(files)} files; skipped: "
                + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:10])
            )
        chunks = index["chunks"]
        manifest = {
            "format": FORMAT,
            "split": spec.mode,
            "params_hash": spec.digest(),
            "spec": spec.__dict__,
            "source": source_info.get("source"),
            "source_fingerprint": source_info.get("fingerprint"),
            "remote": remote,
            "count": sum(int(c["chunk_size"]) for c in chunks),
            "chunks": len(chunks),
            "bytes": sum(int(c["chunk_bytes"]) for c in chunks),
            "images": kept,
            "skipped": skipped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
