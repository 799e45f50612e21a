"""Exact block-coordinate minimisation for layered (bipartite) energies (SC23 "asynchronous" updates).

In a chain without lateral terms, layers of equal parity do not interact, so all even layers can
be set to their exact minimiser given the odd ones, then all odd layers given the even ones.
For a layer with the hard sigmoid under projection onto [0, 1] (EP17 eq. 43), or a linear layer,
the minimiser of F = E + beta C in s_l, with squared-error cost on the driven layer, is::

    s_l = clip((h_l + beta' d) / (1 + beta'), 0, 1)      (beta' = 0 off the driven layer)

where h_l is the layer's field b_l + sum W rho(neighbours) and beta' = beta (nudge_scale "eps")
or beta / eps ("none"), so that the fixed points are exactly those of the Euler loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from earlyprop.cost import SquaredError
from earlyprop.network import Network
from earlyprop.nonlinearity import HardSigmoid, Linear


def check_block_solvable(network: Network, layers: Sequence[int], nudged: bool, cost) -> None:
    """Raise ValueError unless the exact block update applies to this network."""
    for term in network.interactions:
        parities = {layer % 2 for layer in term.layers}
        if len(parities) != 2:
            raise ValueError(
                f"the asynchronous solver needs a bipartite (layered) energy; {type(term).__name__} on layers "
                f"{term.layers} couples layers of equal parity: use method='euler'"
            )
    for layer in layers:
        rho = network.rhos[layer]
        if not isinstance(rho, HardSigmoid | Linear):
            raise ValueError(f"the asynchronous solver has no closed-form minimiser for rho={rho.name} "
                             f"(layer {layer}); use method='euler' or rho hard_sigmoid/linear")
    if nudged and not isinstance(cost, SquaredError):
        raise ValueError("the asynchronous solver supports the squared-error cost only; use method='euler'")


def block_sweep(network: Network, s: list[Tensor], layers: Sequence[int], nudge, beta_scale: float,
                inplace: bool = True, static: list | None = None) -> None:
    """Set each layer in ``layers`` (all of one parity) to its exact minimiser given the others."""
    rates = network.rates(s)
    fields = network.fields(s, rates, static, targets=layers)
    for layer in layers:
        bounds = network.rhos[layer].bounds
        if nudge is not None and layer == network.driven:
            new = _nudged_minimiser(fields[layer], nudge, beta_scale, bounds)
        else:
            new = fields[layer].clamp(*bounds) if bounds is not None else fields[layer]
        if inplace:
            s[layer].copy_(new)
        else:
            s[layer] = new


def _nudged_minimiser(h: Tensor, nudge, beta_scale: float, bounds) -> Tensor:
    """argmin over the box of 1/2 a s^2 - b s with a = 1 + beta', b = h + beta' d.

    For a <= 0 (a negative nudge beta' <= -1) the function is concave or linear and its minimum
    sits on a bound: the one with the lower value.
    """
    beta = nudge.beta[:, None] if isinstance(nudge.beta, Tensor) else torch.as_tensor(nudge.beta)
    a = (1.0 + beta * beta_scale).to(h.dtype)
    b = h + beta * beta_scale * nudge.target
    if bool((a > 0).all()):
        new = b / a
        return new.clamp(*bounds) if bounds is not None else new
    if bounds is None:
        raise ValueError("the nudged output is unbounded below for beta <= -1 with a linear output; "
                         "use |beta| < 1 or method='euler'")
    lo, hi = bounds
    value = lambda v: 0.5 * a * v * v - b * v  # noqa: E731
    on_bound = torch.where(value(hi) < value(lo), torch.full_like(b, hi), torch.full_like(b, lo))
    convex = (b / a.clamp_min(torch.finfo(h.dtype).tiny)).clamp(lo, hi)
    return torch.where(a > 0, convex, on_bound)


def parity_groups(layers: Sequence[int]) -> list[list[int]]:
    even = [layer for layer in layers if layer % 2 == 0]
    odd = [layer for layer in layers if layer % 2 == 1]
    return [group for group in (even, odd) if group]


def max_change(before: Sequence[Tensor], after: Sequence[Tensor], layers: Sequence[int]) -> float:
    """max |after - before| over the given layers (convergence measure of the block solver)."""
    worst = torch.zeros(())
    for layer in layers:
        worst = torch.maximum(worst, (after[layer] - before[layer]).abs().max().cpu())
    return float(worst)
