"""Checkpoints that survive a kill or a damaged disk: `last.ckpt` plus the previous good `prev.ckpt`.

Each is renamed into place only when complete (fsynced) and gets a sidecar with its size and
sha256. Before resuming, the sidecar is checked: a truncated or altered `last.ckpt` is passed
over with a warning for `prev.ckpt`, and with neither usable the run starts afresh instead of
failing on every re-run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sdvae.io import fsync_dir, publish_modes, sha256_file, write_json

LAST = "last.ckpt"
PREV = "prev.ckpt"


def _sidecar(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".sha256.json")


def checkpoint_problem(path: Path, check_hash: bool = True) -> str | None:
    """None when `path` is whole and unchanged since it was written; otherwise what is wrong."""
    if not path.is_file():
        return "missing"
    try:
        meta = json.loads(_sidecar(path).read_text())
        size, sha = int(meta["bytes"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no valid checksum record (an interrupted save?)"
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes on disk, {size} written (truncated or damaged)"
    if check_hash and sha256_file(path) != sha:
        return "sha256 differs from the one recorded when it was written (damaged)"
    return None


def publish_checkpoint(tmp: Path, directory: Path) -> Path:
    """Make a fully written temp checkpoint `last.ckpt`; the previous good one becomes `prev.ckpt`."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    publish_modes(tmp)
    record = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    last, prev = directory / LAST, directory / PREV
    if checkpoint_problem(last, check_hash=False) is None:
        os.replace(last, prev)
        os.replace(_sidecar(last), _sidecar(prev))
    # The record lands first, so a `last.ckpt` that exists is already verifiable; a kill between the
    # two leaves a record without its file, and prev.ckpt is resumed.
    write_json(_sidecar(last), record)
    os.replace(tmp, last)
    fsync_dir(directory)
    return last


def resumable_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies, warning about each one passed over."""
    for candidate in (directory / LAST, directory / PREV):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if candidate.exists():
            print(f"warning: not resuming from {candidate}: {problem}", file=sys.stderr)
    return None
