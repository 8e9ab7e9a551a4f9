"""`hf:` sources: rows flow from `datasets` straight into the cache, never through per-image files.

`download` only opens the dataset (the hub or a local dataset folder, through `datasets`' own
cache) and records what it is in `source.json`: name, split, image column, row count and the
dataset's fingerprint, a small DVC-tracked file, so a changed source re-runs prepare. `prepare`
opens the same dataset again and its workers read the rows' encoded bytes themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdvae.data.common import SourceError, content_hash, in_eval_split


def open_dataset(name: str, image_column: str) -> Any:
    """`name` is `<dataset>[:split]`; images come back undecoded ({"bytes", "path"})."""
    import datasets

    dataset, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, split=split or "train")
    except Exception as exc:  # the hub or the dataset is unreachable: say so plainly
        raise SourceError(
            f"hf:{name}: could not load it with datasets ({exc}); offline, use a local dataset folder, "
            "folder:<path> or builtin:photos"
        ) from exc
    if image_column not in ds.column_names:
        raise SourceError(f"hf:{name}: no column {image_column!r} (columns: {ds.column_names}); set data.image_column")
    return ds.cast_column(image_column, datasets.Image(decode=False))


def record_source(
    spec: str, out: Path, image_column: str, max_images: int, shared: bool, eval_fraction: float, is_eval: bool
) -> dict:
    """Write `out/source.json` describing the rows this split will read (no image files)."""
    name = spec.partition(":")[2]
    ds = open_dataset(name, image_column)
    rows = len(ds) if not max_images else min(max_images, len(ds))
    if rows == 0:
        raise SourceError(f"source {spec!r} has no rows")
    info = {
        "source": spec,
        "kind": "hf",
        "dataset": name,
        "image_column": image_column,
        "rows": rows,
        "fingerprint": ds._fingerprint,  # changes with the dataset's files or revision
        "shared_source_split": shared,
        "eval_fraction": eval_fraction,
        "is_eval": is_eval,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@dataclass
class RowReader:
    """Picklable reader for prepare's workers: row name -> encoded bytes, or None when the row
    belongs to the other split (train and eval drawn from one dataset by content hash)."""

    info: dict[str, Any]
    _ds: Any = None

    @property
    def names(self) -> list[str]:
        return [f"row-{i:08d}" for i in range(self.info["rows"])]

    def __call__(self, name: str) -> bytes | None:
        if self._ds is None:
            self._ds = open_dataset(self.info["dataset"], self.info["image_column"])
        cell = self._ds[int(name.removeprefix("row-"))][self.info["image_column"]]
        data = cell.get("bytes") or Path(cell["path"]).read_bytes()
        if (
            self.info["shared_source_split"]
            and in_eval_split(content_hash(data), self.info["eval_fraction"]) != (self.info["is_eval"])
        ):
            return None
        return data

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info, "_ds": None}  # each worker opens the memory-mapped dataset itself
