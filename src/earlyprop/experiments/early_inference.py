"""Early inference approximates back-propagation (THEORY §1.9, BF-11..BF-15; checks T4a-d).

Relax to the free fixed point s*, then run the nudged and the free chain from s* and compare
them: the layer at distance k from the driven layer first differs after exactly k + 1 steps,
and that first change is -beta * c * eps^k * delta_k with c = eps (``nudge_scale="eps"``) or
c = 1 (``"none"``), where delta_k is the layered back-propagated error (THEORY ref A).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.dynamics import relax, residual
from earlyprop.network import Network, State
from earlyprop.newton import polish

LATER_OFFSETS = (1, 3, 10)


def layer_distances(network: Network) -> dict[int, int]:
    """Graph distance of every free layer from the driven layer (see ``Network.distances``)."""
    return network.distances()


def free_fixed_point(
    network: Network, x: Tensor, *, eps: float = 0.2, steps: int = 20000, tol: float = 1e-10, newton: bool = True
) -> tuple[State, float]:
    """Relax the free phase from rest (Euler), then Newton-polish it in float64 (THEORY §2 RC)."""
    state, diag = relax(network, network.init_state(x), steps=steps, eps=eps, tol=tol)
    if newton:
        state, diag = polish(network, state, tol=1e-14)
    return state, diag.residual


def layered_deltas(network: Network, state: Sequence[Tensor], target: Tensor, cost: Cost | None = None) -> dict[
    int, Tensor
]:
    """Reference A: delta_driven = dC/dy, delta at distance k = sum of J_{m,l}^T delta_m over neighbours m
    at distance k - 1, with J the partial Jacobian of the drive R at s* (BF-8, BF-15)."""
    cost = cost or SquaredError()
    dist = layer_distances(network)
    deltas = {network.driven: cost.grad(state[network.driven], target).detach()}
    for k in range(1, max(dist.values()) + 1):
        sources = [m for m, d in dist.items() if d == k - 1]
        targets = [m for m, d in dist.items() if d == k]
        with torch.enable_grad():
            s = [t.detach().requires_grad_(i in targets) for i, t in enumerate(state)]
            drive = network.drive(s)
            total = sum((drive[m] * deltas[m]).sum() for m in sources)
            grads = torch.autograd.grad(total, [s[m] for m in targets])
        deltas.update({m: g.detach() for m, g in zip(targets, grads)})
    return deltas


@dataclass
class LayerAlignment:
    """Early-inference result for one layer (worst case over the batch)."""

    layer: int
    distance: int
    first_step: int
    cosine: float
    magnitude_ratio: float
    later_cosines: dict[int, float]


@dataclass
class EarlyInferenceResult:
    layers: list[LayerAlignment]
    residual: float
    eps: float
    beta: float
    nudge_scale: str
    change_norms: Tensor = field(repr=False)  # (steps + 1, n_layers): ||s^beta_t - s^0_t|| per layer
    cosines: Tensor = field(repr=False)  # (steps + 1, n_layers): cos(s^beta_t - s^0_t, -delta)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-example cosine of two (batch, n) tensors; NaN where either vector is zero."""
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(num, math.nan))


def early_inference(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    beta: float,
    eps: float,
    nudge_scale: str = "eps",
    steps: int | None = None,
    state: Sequence[Tensor] | None = None,
    cost: Cost | None = None,
    rho_prime_factor: bool = True,
) -> EarlyInferenceResult:
    """Run the seed's experiment and measure every free layer against -delta (T4a, T4b, T4d)."""
    if state is None:
        state, res = free_fixed_point(network, x)
    else:
        res = residual(network, state)
    dist = layer_distances(network)
    deltas = layered_deltas(network, state, target, cost)
    steps = steps if steps is not None else max(dist.values()) + 1 + max(LATER_OFFSETS)
    common = dict(steps=steps, eps=eps, nudge_scale=nudge_scale, record_trajectory=True,
                  rho_prime_factor=rho_prime_factor)
    _, free = relax(network, state, **common)
    _, nudged = relax(network, state, beta=beta, target=target, cost=cost, **common)
    diffs = [[a - b for a, b in zip(sn, sf)] for sn, sf in zip(nudged.trajectory, free.trajectory)]
    scale = abs(beta) * (eps if nudge_scale == "eps" else 1.0)
    layers = sorted(dist, key=lambda m: dist[m])
    norms = torch.tensor([[float(d[m].norm()) for m in layers] for d in diffs], dtype=torch.float64)
    cosines = torch.tensor([[float(cosine(d[m], -math.copysign(1, beta) * deltas[m]).min()) for m in layers]
                            for d in diffs], dtype=torch.float64)
    results = []
    for m in layers:
        k = dist[m]
        moved = [t for t, d in enumerate(diffs) if bool((d[m] != 0).any())]
        first = moved[0] if moved else -1
        change = diffs[first][m] if moved else torch.zeros_like(deltas[m])
        expected = -math.copysign(1, beta) * deltas[m]
        ratio = change.norm(dim=-1) / (scale * eps**k * deltas[m].norm(dim=-1))
        later = {e: float(cosine(diffs[k + e][m], expected).min()) for e in LATER_OFFSETS if k + e < len(diffs)}
        results.append(LayerAlignment(
            layer=m, distance=k, first_step=first, cosine=float(cosine(change, expected).min()),
            magnitude_ratio=float(ratio[(ratio - 1).abs().argmax()]), later_cosines=later,
        ))
    return EarlyInferenceResult(results, res, eps, beta, nudge_scale, norms, cosines)


def eps_slopes(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    eps_values: Sequence[float] = (0.2, 0.1, 0.05, 0.025),
    beta: float = 1e-3,
    nudge_scale: str = "eps",
    state: Sequence[Tensor] | None = None,
) -> dict[int, float]:
    """Log-log slope of ||first change|| against eps per distance k (T4c): k + 1 under the default
    nudge convention, k with ``nudge_scale="none"`` (THEORY A1)."""
    if state is None:
        state, _ = free_fixed_point(network, x)
    dist = layer_distances(network)
    logs: dict[int, list[float]] = {}
    for eps in eps_values:
        result = early_inference(network, x, target, beta=beta, eps=eps, nudge_scale=nudge_scale, state=state,
                                 steps=max(dist.values()) + 1)
        for layer in result.layers:
            value = layer.magnitude_ratio * abs(beta) * eps ** (layer.distance + (nudge_scale == "eps"))
            logs.setdefault(layer.layer, []).append(math.log(value))
    log_eps = torch.tensor([math.log(e) for e in eps_values], dtype=torch.float64)
    slopes = {}
    for layer, ys in logs.items():
        y = torch.tensor(ys, dtype=torch.float64)
        centred = log_eps - log_eps.mean()
        slopes[dist[layer]] = float((centred * (y - y.mean())).sum() / (centred**2).sum())
    return slopes
