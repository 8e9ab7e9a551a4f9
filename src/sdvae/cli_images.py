"""Image subcommands of `sdvae` (compare, reconstruct, encode, decode)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Attach the image subcommands; filled in as the metric and inference modules land."""
