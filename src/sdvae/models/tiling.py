"""Overlapping-tile application of a convolutional map, with linear-ramp blending.

Encoding or decoding a 4k image in one piece needs tens of GB for activations; tiles bound the
memory. Each output pixel is a weighted mean of the tiles covering it, the weights ramping
linearly across overlaps, so seams do not show.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """Weights along one axis: ramps up over `overlap` at inner edges, 1 elsewhere, never 0."""
    w = torch.ones(length, device=device)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
    n = min(overlap, length)
    if not at_start:
        w[:n] = torch.minimum(w[:n], ramp[:n])
    if not at_end:
        w[-n:] = torch.minimum(w[-n:], ramp[:n].flip(0))
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: float, scale: float, align: int
) -> torch.Tensor:
    """Apply `fn` on `tile`-sized windows of `x` and blend; `fn` maps size s to s * `scale`.

    `align` keeps window starts on multiples of the map's stride (the downsampling factor when
    encoding), so each window lands on whole output pixels.
    """
    tile = max(align, tile - tile % align)
    stride = max(align, int(tile * (1.0 - overlap)) // align * align)
    h, w = x.shape[-2:]
    rows, cols = _starts(h, tile, stride), _starts(w, tile, stride)
    out = weight = None
    for r in rows:
        for c in cols:
            piece = fn(x[..., r : r + tile, c : c + tile])
            ph, pw = piece.shape[-2:]
            orow, ocol = round(r * scale), round(c * scale)
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], round(h * scale), round(w * scale))
                weight = piece.new_zeros(round(h * scale), round(w * scale))
            ov_h = round((tile - stride) * scale) if len(rows) > 1 else 0
            ov_w = round((tile - stride) * scale) if len(cols) > 1 else 0
            wh = _ramp(ph, ov_h, r == rows[0], r == rows[-1], x.device)
            ww = _ramp(pw, ov_w, c == cols[0], c == cols[-1], x.device)
            wmap = (wh[:, None] * ww[None, :]).to(piece.dtype)
            out[..., orow : orow + ph, ocol : ocol + pw] += piece * wmap
            weight[orow : orow + ph, ocol : ocol + pw] += wmap
    assert out is not None and weight is not None
    return out / weight
