"""Gradient-descent updates: nudged increments against BPTT gradients at every step (ER19; THEORY §3.3, T9).

EP side (started at the free fixed point s*, nudged minus free so round-off cancels)::

    Delta_s(t)     = (s^beta_{t+1} - s^beta_t) / beta
    Delta_theta(t) = -eps (dE/dtheta(s^beta_{t+1}) - dE/dtheta(s^beta_t)) / beta

BPTT side: unroll K free steps of the same loop from s*, L = C(s_K) (per example; batch mean for theta),
grad_s(t) = dL/ds_{K-t}, grad_theta(t) = dL/d theta_{K-t} (the copy used in the step into s_{K-t}).
GDU theorem: Delta(t) -> -c * grad(t) as beta -> 0, with c = 1 for ER19's convention
(``nudge_scale="none"``) and c = eps for EP17's (``"eps"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.dynamics import relax
from earlyprop.experiments.early_inference import free_fixed_point
from earlyprop.network import Network


@dataclass
class GDUResult:
    """Per-tensor relative RMSE and sign error (LA21 metric) and the worst per-step cosine."""

    neurons: dict[str, dict[str, float]]
    params: dict[str, dict[str, float]]
    ep: dict[str, Tensor]
    bptt: dict[str, Tensor]

    def summary(self) -> dict[str, float]:
        rows = list(self.neurons.values()) + list(self.params.values())
        return {
            "max_rel_rmse": max(r["rel_rmse"] for r in rows),
            "sign_error": max(r["sign_error"] for r in rows),
            "min_cosine": min(r["min_cosine"] for r in rows),
        }


def gdu_metrics(ep: Tensor, reference: Tensor) -> dict[str, float]:
    """LA21's relative RMSE and sign error over time (axis 0), averaged over elements that ever move,
    plus the minimum over steps of the cosine between the two (steps where both vanish skipped)."""
    ep2, ref2 = ep.flatten(1), reference.flatten(1)
    rmse = ((ep2 - ref2) ** 2).mean(0).sqrt()
    norm = torch.maximum((ep2**2).mean(0).sqrt(), (ref2**2).mean(0).sqrt())
    active = norm > 0
    rel = float((rmse[active] / norm[active]).mean()) if bool(active.any()) else 0.0
    sign = float(((ep2 * ref2) < 0).double().mean())
    cosines = []
    for a, b in zip(ep2, ref2):
        if float(a.norm()) > 0 and float(b.norm()) > 0:
            cosines.append(float((a @ b) / (a.norm() * b.norm())))
    return {"rel_rmse": rel, "sign_error": sign, "min_cosine": min(cosines) if cosines else math.nan}


def bptt_gradients(
    network: Network, state: Sequence[Tensor], target: Tensor, *, eps: float, steps: int, cost: Cost | None = None
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """grad_s(t) per free layer and grad_theta(t) per parameter, t = 0..steps-1, by autograd through the loop."""
    cost = cost or SquaredError()
    start = [t.detach().requires_grad_(i in network.free) for i, t in enumerate(state)]
    _, diag = relax(network, start, steps=steps, eps=eps, record_trajectory=True, differentiable=True)
    traj = diag.trajectory
    # summed over the batch so that grad_s is per example, like the EP neuron increments
    loss = cost.value(traj[-1][network.driven], target).sum()
    batch = traj[-1][network.driven].shape[0]
    by_time = [traj[steps - t] for t in range(steps)]
    flat = [s[m] for s in by_time for m in network.free]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    n_free = len(network.free)
    grad_s = [[g if g is not None else torch.zeros_like(f) for g, f in
               zip(grads[t * n_free:(t + 1) * n_free], flat[t * n_free:(t + 1) * n_free])] for t in range(steps)]
    params = list(network.parameters())
    grad_theta = []
    for t in range(steps):
        before = [s.detach() for s in traj[steps - t - 1]]
        after, _ = relax(network, before, steps=1, eps=eps, differentiable=True)
        with torch.enable_grad():
            total = sum((after[m] * g).sum() for m, g in zip(network.free, grad_s[t]))
            grad_theta.append(list(torch.autograd.grad(total, params, allow_unused=True)))
        # divided by the batch size: dE/dtheta is a batch mean, so L is mean_batch C for theta
        grad_theta[-1] = [g / batch if g is not None else torch.zeros_like(p) for g, p in zip(grad_theta[-1], params)]
    return grad_s, grad_theta


def gdu(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    beta: float,
    eps: float,
    steps: int = 15,
    nudge_scale: str = "none",
    state: Sequence[Tensor] | None = None,
    cost: Cost | None = None,
) -> GDUResult:
    """Compare EP's per-step updates with BPTT's per-step gradients (T9)."""
    if state is None:
        state, _ = free_fixed_point(network, x)
    common = dict(steps=steps, eps=eps, nudge_scale=nudge_scale, record_trajectory=True)
    _, free = relax(network, state, **common)
    _, nudged = relax(network, state, beta=beta, target=target, cost=cost, **common)
    diffs = [[a - b for a, b in zip(sn, sf)] for sn, sf in zip(nudged.trajectory, free.trajectory)]
    param_diffs = [
        [gn - gf for gn, gf in zip(network.energy_param_grads(sn), network.energy_param_grads(sf))]
        for sn, sf in zip(nudged.trajectory, free.trajectory)
    ]
    grad_s, grad_theta = bptt_gradients(network, state, target, eps=eps, steps=steps, cost=cost)
    c = eps if nudge_scale == "eps" else 1.0
    names = dict(network.named_parameters())
    ep, ref, neurons, params = {}, {}, {}, {}
    for j, m in enumerate(network.free):
        key = f"layer{m}"
        ep[key] = torch.stack([(diffs[t + 1][m] - diffs[t][m]) / beta for t in range(steps)])
        ref[key] = -c * torch.stack([grad_s[t][j] for t in range(steps)])
        neurons[key] = gdu_metrics(ep[key], ref[key])
    for j, name in enumerate(names):
        ep[name] = torch.stack([-eps * (param_diffs[t + 1][j] - param_diffs[t][j]) / beta for t in range(steps)])
        ref[name] = -c * torch.stack([grad_theta[t][j] for t in range(steps)])
        params[name] = gdu_metrics(ep[name], ref[name])
    return GDUResult(neurons, params, ep, ref)
