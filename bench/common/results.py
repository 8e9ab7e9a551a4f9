"""One entry of metrics/bench.json, rewritten without touching the others (each bench owns one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdvae.io import write_json


def store_entry(path: str | Path, key: str, entry: Any) -> None:
    out = Path(path)
    bench = json.loads(out.read_text()) if out.is_file() else {}
    bench[key] = entry
    write_json(out, bench)
