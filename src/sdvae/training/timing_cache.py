"""Per-machine, per-workload cache of measured step timings.

Why a cache: `train.precision: auto` and a budgeted run (`train.max_steps: null`) decide from
timings. Measured once per machine and workload, they cost a rerun or a resume nothing and
cannot flip on noise. The key names everything that changes the answer: the CPU (model string,
flags, the ATen and oneDNN instruction-set caps in force, thread count) or GPU, the torch
version, and the workload (architecture, discriminator, resolution, batch, precision choices).
The file: `$SDVAE_TIMING_CACHE`, else `timings.json` in the sdvae cache directory; `sdvae info
--retime` drops the entry of the params at hand, deleting the file drops all. A run that has a
checkpoint never reads its decisions from here again: they live in the checkpoint's record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from sdvae.io import write_json
from sdvae.pretrained import default_cache_dir


def cache_file() -> Path:
    explicit = os.environ.get("SDVAE_TIMING_CACHE")
    return Path(explicit).expanduser() if explicit else default_cache_dir() / "timings.json"


def _cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's `model name`, family, model and flags (empty off Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags", "vendor_id"):
            fields[key] = value.strip()
    return fields


def machine_identity(device: str = "cpu") -> dict[str, Any]:
    """What makes timings on this machine differ from another's (readable, for `sdvae info`)."""
    info = _cpuinfo_fields()
    identity: dict[str, Any] = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cpu_flags_sha": hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:16],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "system": platform.system(),
    }
    if device == "cuda" and torch.cuda.is_available():
        identity["gpu"] = torch.cuda.get_device_name()
    return identity


def cache_key(machine: dict[str, Any], workload: dict[str, Any]) -> str:
    blob = json.dumps({"machine": machine, "workload": workload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_entry(key: str) -> dict[str, Any]:
    path = cache_file()
    try:
        return dict(json.loads(path.read_text()).get(key, {}))
    except (OSError, ValueError):
        return {}


@contextmanager
def _locked_cache() -> Iterator[dict[str, Any]]:
    """The whole cache under its file lock; written back on exit when the caller changed it."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            everything = json.loads(path.read_text())
        except (OSError, ValueError):
            everything = {}
        before = json.dumps(everything, sort_keys=True)
        yield everything
        if json.dumps(everything, sort_keys=True) != before:
            write_json(path, everything)


@contextmanager
def locked_entry(key: str) -> Iterator[dict[str, Any]]:
    """The entry for `key`, held under a file lock so processes on one machine (DDP ranks) measure
    once: the first measures and writes, the next finds the result. Changes are written on exit."""
    with _locked_cache() as everything:
        entry = dict(everything.get(key, {}))
        before = json.dumps(entry, sort_keys=True)
        yield entry
        if json.dumps(entry, sort_keys=True) != before:  # an entry looked at only adds nothing
            everything[key] = entry


def forget_entry(key: str) -> bool:
    """Remove the entry for `key` (written back by `_locked_cache`); whether there was one."""
    with _locked_cache() as everything:
        return everything.pop(key, None) is not None
