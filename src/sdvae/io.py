"""Atomic file and directory writes: a reader never sees half an output.

Everything the pipeline produces (caches, checkpoints, exports, metrics) goes through these,
so an interrupted stage leaves either the old output or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give files and folders under `root` the modes a plain `open`/`mkdir` would: 0666/0777 less the umask.

    Temp files (mkstemp, mkdtemp, safetensors' own writer) are created 0600/0700; renamed into
    place as they are, a model folder shared on a multi-user machine would be unreadable to others.
    """
    mask = current_umask()
    if root.is_dir():
        os.chmod(root, 0o777 & ~mask)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
    else:
        os.chmod(root, 0o666 & ~mask)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent, target.name)  # leftovers of a killed earlier writer
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        publish_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `target`; renamed over it (fsynced) when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        publish_modes(tmp)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def clean_stale_temps(directory: str | Path, name: str = "*") -> None:
    """Remove temp leftovers of a killed writer of `name` (`.name.tmp-*`, `.name.old-*`).

    Callers hold the output exclusively (DVC locks the repo while a stage runs).
    """
    d = Path(directory)
    if not d.is_dir():
        return
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for p in d.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
