"""The seed's STDP-like rule is an SGD direction during early inference (THEORY §1.10, BF-17; check T10).

From the free fixed point s*, run the nudged and the free chain (same relaxation loop). For each
layered weight W_l (pre = layer l, post = layer l + 1, the post layer is the one closer to the driven
layer, so it moves first), take the first step in which the post layer moves and form

* the plain seed rule        Delta W = sdot_post rho(s_pre)^T                 (BF-17, STDP15)
* the Xie–Seung form         Delta W = rhodot(s_post) rho(s_pre)^T            (EP17 eq. 12)

and compare each with -dC/dW_l under the layered back-propagation of THEORY ref A,
dC/dW_l = (delta_{l+1} * rho'(s_{l+1})) rho(s_l)^T. Velocities are nudged-minus-free differences so
that the round-off of the fixed point cancels (THEORY §2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost
from earlyprop.dynamics import relax
from earlyprop.experiments.early_inference import cosine, free_fixed_point, layer_distances, layered_deltas
from earlyprop.network import Network


@dataclass
class STDPLayerAlignment:
    """Cosines of the two STDP forms with -dC/dW for one layered weight.

    ``plain`` / ``xie_seung``: worst case over the batch of the per-example cosine;
    ``plain_batch`` / ``xie_seung_batch``: cosine of the batch-summed updates (a minibatch step).
    """

    pre: int
    post: int
    distance: int  # distance of the post layer from the driven layer
    first_step: int  # index of the first state in which the post layer differs (distance + 1)
    plain: float
    xie_seung: float
    plain_batch: float
    xie_seung_batch: float


def rate_change(rho, before: Tensor, after: Tensor) -> Tensor:
    """rho(after) - rho(before), evaluated as rho'(midpoint) * (after - before).

    Why: in early inference after - before is O(beta eps^(k+1)) ~ 1e-12 while the rates are O(1), so the
    plain difference of two rates loses ~4 of float64's 16 digits to cancellation. The midpoint rule has
    the same leading term and an O(|after - before|^3) error, i.e. it is the continuous-time Xie–Seung
    rate rho'(s) sdot (EP17 eq. 12) evaluated to second order.
    """
    return rho.rho_prime(0.5 * (before + after)) * (after - before)


def stdp_alignment(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    beta: float = 1e-5,
    eps: float = 0.05,
    nudge_scale: str = "eps",
    state: Sequence[Tensor] | None = None,
    cost: Cost | None = None,
) -> list[STDPLayerAlignment]:
    """Per layered weight, the cosines of the plain and the Xie–Seung STDP updates with -dC/dW (T10)."""
    if beta == 0:
        raise ValueError("stdp_alignment needs a non-zero beta (the nudge is the signal)")
    if state is None:
        state, _ = free_fixed_point(network, x)
    dist = layer_distances(network)
    deltas = layered_deltas(network, state, target, cost)
    steps = max(dist.values()) + 1
    common = dict(steps=steps, eps=eps, nudge_scale=nudge_scale, record_trajectory=True)
    _, free = relax(network, state, **common)
    _, nudged = relax(network, state, beta=beta, target=target, cost=cost, **common)
    sign = math.copysign(1.0, beta)
    results = []
    for term in network.layered_pairs():
        pre, post = term.pre, term.post
        if post not in dist or dist.get(pre, math.inf) <= dist[post]:
            continue  # the layered reading needs the post layer to be the one the signal reaches first
        moved = [t for t, (sn, sf) in enumerate(zip(nudged.trajectory, free.trajectory))
                 if bool((sn[post] != sf[post]).any())]
        if not moved:
            continue
        t = moved[0]
        rho_post = network.rhos[post]
        # nudged-minus-free velocity of the post layer over the step t-1 -> t; before t the two chains agree
        # bit for bit (T4a), so this is the nudge-induced part of sdot
        sdot = ((nudged.trajectory[t][post] - free.trajectory[t][post])
                - (nudged.trajectory[t - 1][post] - free.trajectory[t - 1][post]))
        rhodot = (rate_change(rho_post, free.trajectory[t][post], nudged.trajectory[t][post])
                  - rate_change(rho_post, free.trajectory[t - 1][post], nudged.trajectory[t - 1][post]))
        # the pre layer has not moved yet: its rate is the free-chain rate before the step
        r_pre = network.rhos[pre].rho(free.trajectory[t - 1][pre])
        # -dC/dW_l, layered (ref A): -(delta_post * rho'(s*_post)) rho(s*_pre)^T, signed like the nudge
        error = -sign * deltas[post] * rho_post.rho_prime(state[post])
        reference = network.rhos[pre].rho(state[pre])
        plain = _outer_cosines(sdot, r_pre, error, reference)
        xie_seung = _outer_cosines(rhodot, r_pre, error, reference)
        results.append(STDPLayerAlignment(
            pre=pre, post=post, distance=dist[post], first_step=t, plain=plain[0], xie_seung=xie_seung[0],
            plain_batch=plain[1], xie_seung_batch=xie_seung[1],
        ))
    return results


def _outer_cosines(post_a: Tensor, pre_a: Tensor, post_b: Tensor, pre_b: Tensor) -> tuple[float, float]:
    """(min over the batch of cos(a_b pre_a_b^T, b_b pre_b_b^T), cos of the batch sums)."""
    per_example = cosine(torch.einsum("bi,bj->bij", post_a, pre_a).flatten(1),
                         torch.einsum("bi,bj->bij", post_b, pre_b).flatten(1))
    summed_a = (post_a.T @ pre_a).flatten()[None]
    summed_b = (post_b.T @ pre_b).flatten()[None]
    return float(per_example.min()), float(cosine(summed_a, summed_b)[0])
