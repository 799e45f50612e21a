"""GDU is only approximate for ER19's "prototypical" map s <- sigma(dPhi/ds) (THEORY §3.3, A19, A22; check T14).

With Phi = 1/2 s^T W s over the layered coupling, each free layer is set to
sigma(b_l + W_{l-1} s_{l-1} + W_l^T s_{l+1}) with sigma(a) = sigmoid(4 (a - 0.5)) and the states used as
rates (dt = 1, A22). The nudge is added outside sigma on the driven layer (ER19 ``EPdisc``):
s_out <- sigma(.) - beta dC/ds_out = sigma(.) + beta (d - s_out). The Jacobian diag(sigma') W is not
symmetric, so the EP increments propagate with J while BPTT propagates with J^T: they agree exactly at
t = 0 and only approximately afterwards. The network's Dense weights and biases are reused as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.dynamics import DivergenceError
from earlyprop.experiments.gdu import gdu_metrics
from earlyprop.network import Network, State


def er19_sigma(a: Tensor) -> Tensor:
    """sigma(a) = sigmoid(4 (a - 0.5)), ER19's rate function for the prototypical setting."""
    return torch.sigmoid(4.0 * (a - 0.5))


def prototypical_step(
    network: Network, state: Sequence[Tensor], *, beta: float = 0.0, target: Tensor | None = None,
    cost: Cost | None = None,
) -> State:
    """One synchronous step of the prototypical map; the nudge sits outside sigma (ER19)."""
    rates = list(state)  # the prototypical model uses the states themselves as rates
    fields = network.fields(state, rates=rates)
    new = list(state)
    for layer in network.free:
        new[layer] = er19_sigma(fields[layer])
    if beta != 0:
        cost = cost or SquaredError()
        new[network.driven] = new[network.driven] - beta * cost.grad(state[network.driven], target)
    return new


def prototypical_fixed_point(
    network: Network, x: Tensor, *, steps: int = 2000, tol: float = 1e-14
) -> State:
    """Iterate the free map from rest until max |s_{t+1} - s_t| <= tol."""
    state = network.init_state(x)
    change = math.inf
    with torch.no_grad():
        for step in range(1, steps + 1):
            new = prototypical_step(network, state)
            change = max(float((a - b).abs().max()) for a, b in zip(new, state))
            state = new
            if not math.isfinite(change):
                raise DivergenceError(f"prototypical map diverged by step {step}")
            if change <= tol:
                return state
    raise RuntimeError(f"prototypical map did not converge in {steps} steps (last change {change:.3g} > {tol:g})")


@dataclass
class PrototypicalGDU:
    """Per-step cosines of (-Delta^EP_s(t), grad^BPTT_s(t)) over all free units (worst example), the same for
    the accumulated updates sum_{tau <= t} (what a learning rule integrates), per layer (NaN while a layer
    has not moved), and LA21's metrics per layer."""

    cosines: list[float]
    cumulative_cosines: list[float]
    layer_cosines: dict[int, list[float]]
    metrics: dict[int, dict[str, float]]
    ep: dict[int, Tensor]
    bptt: dict[int, Tensor]


def prototypical_gdu(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    beta: float = 1e-4,
    steps: int = 10,
    state: Sequence[Tensor] | None = None,
    cost: Cost | None = None,
) -> PrototypicalGDU:
    """EP neuron increments of the nudged prototypical map vs BPTT through the unrolled free map (T14)."""
    if beta == 0:
        raise ValueError("prototypical_gdu needs a non-zero beta")
    cost = cost or SquaredError()
    if state is None:
        state = prototypical_fixed_point(network, x)
    state = [s.detach() for s in state]
    free_layers = list(network.free)

    with torch.no_grad():  # EP side: nudged minus free, both from s*, so the fixed-point error cancels
        free_traj, nudged_traj = [state], [state]
        for _ in range(steps):
            free_traj.append(prototypical_step(network, free_traj[-1]))
            nudged_traj.append(prototypical_step(network, nudged_traj[-1], beta=beta, target=target, cost=cost))
        diffs = [[a - b for a, b in zip(sn, sf)] for sn, sf in zip(nudged_traj, free_traj)]
        ep = {m: torch.stack([(diffs[t + 1][m] - diffs[t][m]) / beta for t in range(steps)]) for m in free_layers}

    with torch.enable_grad():  # BPTT side: L = sum_b C(s_K), grad_s(t) = dL/ds_{K-t}
        traj = [[s.clone().requires_grad_(i in free_layers) for i, s in enumerate(state)]]
        for _ in range(steps):
            traj.append(prototypical_step(network, traj[-1]))
        loss = cost.value(traj[-1][network.driven], target).sum()
        wrt = [traj[steps - t][m] for t in range(steps) for m in free_layers]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    n = len(free_layers)
    bptt = {m: torch.stack([_or_zeros(grads[t * n + j], wrt[t * n + j]) for t in range(steps)]).detach()
            for j, m in enumerate(free_layers)}

    whole_ep = torch.cat([ep[m] for m in free_layers], dim=-1)  # (steps, batch, n_free)
    whole_bptt = torch.cat([bptt[m] for m in free_layers], dim=-1)
    cosines = [_worst_cosine(-whole_ep[t], whole_bptt[t]) for t in range(steps)]
    summed_ep, summed_bptt = whole_ep.cumsum(0), whole_bptt.cumsum(0)
    cumulative = [_worst_cosine(-summed_ep[t], summed_bptt[t]) for t in range(steps)]
    layer_cosines = {m: [_worst_cosine(-ep[m][t], bptt[m][t]) for t in range(steps)] for m in free_layers}
    metrics = {m: gdu_metrics(ep[m], -bptt[m]) for m in free_layers}
    return PrototypicalGDU(cosines, cumulative, layer_cosines, metrics, ep, bptt)


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else torch.zeros_like(like)


def _worst_cosine(a: Tensor, b: Tensor) -> float:
    """Minimum over the batch of cos(a_b, b_b); NaN if either side is zero for some example."""
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    if bool((den == 0).any()):
        return math.nan
    return float((num / den).min())
