"""The end of an optimisation window: unscale, clip, agree on finiteness across ranks, step all
trained optimizers or none, and update the loss scale once.

Why not Lightning's `optimizer.step()` under a GradScaler: Lightning calls `scaler.update()`
inside each optimizer's step, so with two optimizers in one window the second is unscaled by a
scale the first already changed (2x off after an overflow), and off CUDA (mps, no fused AdamW) it
unscales a second time and raises. The AMP recipe for several optimizers is one `unscale_` and
one `scaler.step` per optimizer, then one `update()` per iteration; this is it.

Why all or none: a window whose losses or gradients are non-finite on any rank is skipped on
every rank (DDP ranks must take the same steps, or their weights part), and it is not a training
step: no counter, no LR schedule, no EMA moves for it. Under a GradScaler, finite losses with
non-finite gradients are an overflow, the scaler's normal way to find its scale: the caller
tells those apart (`Outcome.overflow`) from a diverging run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer


def finite_grads(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())


@dataclass(frozen=True)
class Outcome:
    stepped: bool
    overflow: bool  # skipped only because scaled gradients overflowed (finite losses, a scaler)
    logs: dict[str, torch.Tensor]


@dataclass
class Trained:
    name: str  # "g" | "d"
    optimizer: Optimizer  # the raw torch optimizer
    params: list[nn.Parameter]
    step: Callable[[], object]  # the trainer's own step, used when there is no loss scaler


def finish_window(
    trained: list[Trained],
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
    bad: torch.Tensor,
    any_rank: Callable[[torch.Tensor], torch.Tensor],
) -> Outcome:
    """Whether the window stepped, whether it was an overflow, gradient-norm logs. `bad` counts the
    non-finite losses of the window's micro-batches on this rank; `any_rank` reduces with max."""
    logs: dict[str, torch.Tensor] = {}
    loss_bad = any_rank(bad) > 0
    for t in trained:
        if scaler is not None:
            scaler.unscale_(t.optimizer)
        if grad_clip > 0:
            logs[f"grad_norm_{t.name}"] = torch.nn.utils.clip_grad_norm_(t.params, grad_clip).detach()
        if not finite_grads(t.params):
            bad = bad + 1
    stepped = bool(any_rank(bad) == 0)  # losses and gradients, on every rank
    for t in trained:
        if stepped:
            if scaler is not None:
                scaler.step(t.optimizer)  # gradients already unscaled and checked finite
            else:
                t.step()
        t.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()  # once per window; lowers the scale if any optimizer's unscale found inf/nan
    return Outcome(stepped, not stepped and scaler is not None and not bool(loss_bad), logs)
