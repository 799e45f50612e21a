"""Newton polishing of fixed points (THEORY A11): dF/ds = 0 solved per example to float64 round-off,
for theory experiments that need the exact equilibrium the relaxation only approaches."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from earlyprop.cost import Cost
from earlyprop.dynamics import Diagnostics, DivergenceError, residual
from earlyprop.network import Network, State
from earlyprop.nudge import Nudge, check_nudge_fits, make_nudge


def polish(
    network: Network,
    state: Sequence[Tensor],
    *,
    beta: float | Tensor = 0.0,
    target: Tensor | None = None,
    cost: Cost | None = None,
    tol: float = 1e-13,
    max_iter: int = 50,
) -> tuple[State, Diagnostics]:
    """Newton's method on dF/ds = 0 per example (THEORY A11); for float64 theory experiments.

    Start from a state already near a stable fixed point (e.g. after :func:`relax`).
    """
    network.check_state(state)
    nudge = make_nudge(beta, target, cost)
    check_nudge_fits(network, nudge, state)
    free = list(network.free)
    s = [t.detach().clone() for t in state]
    it, res = 0, residual(network, s, beta, target, cost)
    while res > tol and it < max_iter:
        hess = _hessian(network, s, nudge)
        with torch.no_grad():  # the polished state is data: no autograd graph back to the parameters
            grads = _force_gradient(network, s, nudge)
            step = torch.linalg.solve(hess, grads.unsqueeze(-1)).squeeze(-1)
        offset = 0
        for layer in free:
            n = network.sizes[layer]
            s[layer] = s[layer] - step[:, offset:offset + n]
            offset += n
        it += 1
        res = residual(network, s, beta, target, cost)
        if not math.isfinite(res):
            raise DivergenceError(f"Newton polishing diverged at iteration {it}; relax closer to the fixed point")
    return s, Diagnostics(it, res, res <= tol)


def _force_gradient(network: Network, s: State, nudge: Nudge | None) -> Tensor:
    g = network.grad_energy(s)
    if nudge is not None:
        g[network.driven] = g[network.driven] + nudge.force(s[network.driven])
    return torch.cat([g[layer] for layer in network.free], dim=-1)


def _hessian(network: Network, s: State, nudge: Nudge | None) -> Tensor:
    """Per-example Hessian of F w.r.t. the free state, shape (batch, n_free, n_free)."""
    free = list(network.free)
    flat = torch.cat([s[layer] for layer in free], dim=-1).detach().requires_grad_(True)
    with torch.enable_grad():
        parts = list(s)
        offset = 0
        for layer in free:
            n = network.sizes[layer]
            parts[layer] = flat[:, offset:offset + n]
            offset += n
        g = _force_gradient(network, parts, nudge)
        rows = []
        for i in range(g.shape[1]):
            (row,) = torch.autograd.grad(g[:, i].sum(), flat, retain_graph=True)
            rows.append(row)
    # examples are independent, so d g[b, i] / d flat[b', j] vanishes for b != b'
    return torch.stack(rows, dim=1)
