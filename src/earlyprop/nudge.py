"""The nudge of BF-9: the outside force beta dC/dy on the driven layer, and the checks that it fits the layer
(run once per nudged phase, so they stay cheap)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.network import Network, all_finite


@dataclass(frozen=True)
class Nudge:
    """The outside driving force beta * dC/dy on the driven layer (BF-9).

    ``beta`` is a float or a tensor of one value per example (random-sign EP).
    """

    beta: float | Tensor
    target: Tensor
    cost: Cost = SquaredError()

    def force(self, y: Tensor) -> Tensor:
        beta = self.beta[:, None] if isinstance(self.beta, Tensor) else self.beta
        return beta * self.cost.grad(y, self.target)

    def value(self, y: Tensor) -> Tensor:
        beta = self.beta if isinstance(self.beta, Tensor) else torch.as_tensor(self.beta)
        return beta * self.cost.value(y, self.target)


def make_nudge(beta: float | Tensor, target: Tensor | None, cost: Cost | None) -> Nudge | None:
    """A Nudge, or None when beta is zero (free phase)."""
    if isinstance(beta, Tensor):
        if not all_finite(beta):
            raise ValueError("beta contains NaN or inf")
        if not bool((beta != 0).any()):
            return None
    else:
        if not math.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        if beta == 0:
            return None
    if target is None:
        raise ValueError("a nudged phase (beta != 0) needs a target")
    if not all_finite(target.float() if not target.is_floating_point() else target):
        raise ValueError("target contains NaN or inf")
    return Nudge(beta, target, cost or SquaredError())


def check_nudge_fits(network: Network, nudge: Nudge | None, state: Sequence[Tensor]) -> None:
    """Raise ValueError when beta or the target does not fit the driven layer, instead of a broadcasting
    error deep in the loop or, worse, a silent broadcast (a (batch, 1) target for a (batch, n) layer)."""
    if nudge is None:
        return
    y = state[network.driven]
    where = f"the driven layer {network.driven} of shape {tuple(y.shape)}"
    if isinstance(nudge.beta, Tensor) and tuple(nudge.beta.shape) != (y.shape[0],):
        raise ValueError(f"per-example beta has shape {tuple(nudge.beta.shape)}, expected ({y.shape[0]},) for {where}")
    if nudge.target.dim() == y.dim() and nudge.target.shape != y.shape:
        raise ValueError(f"target has shape {tuple(nudge.target.shape)}, which does not match {where}")
    try:  # squared error's force beta (y - d) has a shape known without arithmetic (this runs every nudged phase)
        if type(nudge.cost) is SquaredError:
            shape = broadcast_shape(y.shape, nudge.target.shape)
            if isinstance(nudge.beta, Tensor):
                shape = broadcast_shape(shape, (nudge.beta.shape[0], 1))
        else:
            shape = nudge.force(y).shape
    except RuntimeError as err:
        raise ValueError(f"target of shape {tuple(nudge.target.shape)} does not fit {where}: {err}") from err
    if shape != y.shape:
        raise ValueError(f"target of shape {tuple(nudge.target.shape)} does not fit {where}")


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(a, b)`` for two shapes, without its tensor machinery (~25 us a call on CPU: it
    runs on every nudged phase); RuntimeError when they do not broadcast, as torch raises."""
    size = max(len(a), len(b))
    a, b = (1,) * (size - len(a)) + tuple(a), (1,) * (size - len(b)) + tuple(b)
    if any(m != n and 1 not in (m, n) for m, n in zip(a, b)):
        raise RuntimeError(f"shapes {list(a)} and {list(b)} do not broadcast")
    return torch.Size(n if m == 1 else m for m, n in zip(a, b))
