"""What every source reader shares: its error type and the content-hash train/eval split.

Its own module so that `hf` needs nothing from `sources` (which imports `hf`): imports run one way.
"""

from __future__ import annotations

import hashlib


class SourceError(RuntimeError):
    """A source spec is malformed or its data cannot be obtained here."""


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def in_eval_split(digest: str, fraction: float) -> bool:
    """Deterministic split by content: the same image always lands on the same side."""
    return int(digest[:16], 16) / float(1 << 64) < fraction
