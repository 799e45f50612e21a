"""Exact block-coordinate minimisation for layered (bipartite) energies (SC23 "asynchronous" updates).

In a chain without lateral terms, layers of equal parity do not interact, so all even layers can
be set to their exact minimiser given the odd ones, then all odd layers given the even ones.
For a layer with the hard sigmoid under projection onto [0, 1] (EP17 eq. 43), or a linear layer,
the minimiser of F = E + beta C in s_l, with squared-error cost on the driven layer, is::

    s_l = clip((h_l + beta' d) / (1 + beta'), 0, 1)      (beta' = 0 off the driven layer)

where h_l is the layer's field b_l + sum W rho(neighbours) and beta' = beta (nudge_scale "eps")
or beta / eps ("none"), so that the fixed points are exactly those of the Euler loop.

Over-relaxation (projected block SOR): with ``omega`` != 1 each block moves ``omega`` of the way to its
unconstrained minimiser m_l and is then projected, s_l <- clip(s_l + omega (m_l - s_l), 0, 1). Given its
neighbours a block's energy is (a/2)|s_l - m_l|^2 + const with a > 0 and separable over units, so for
0 < omega < 2 every block update still lowers the energy, and the fixed points (s_l = clip(m_l)) are the same
as omega = 1's. For omega > 1 it is clip(s_l + omega (clip(m_l) - s_l)): units whose minimiser lies outside
the box still land on the bound. Near a fixed point with a slowly converging (nearly critical) mode this
cuts the sweeps a lot (BENCHMARKS.md, "Over-relaxation").
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
                inplace: bool = True, static: list | None = None, curvature: tuple | None = None,
                omega: float = 1.0, rates: list[Tensor] | None = None) -> None:
    """Set each layer in ``layers`` (all of one parity) to its exact minimiser given the others
    (``omega`` != 1: move ``omega`` of the way there, then project; see the module docstring).

    ``curvature``: :func:`nudge_curvature` of the nudge, computed once per phase (it costs a host sync for a
    per-example beta); computed here when None. ``rates``: rho(s) per layer, computed once by the caller and kept
    up to date here, so that the other parity's unchanged rates stay the same tensors (a max-pool conv term then
    reuses its convolution, :class:`earlyprop.conv.ConvPool`).
    """
    rates = network.rates(s) if rates is None else rates
    fields = network.fields(s, rates, static, targets=layers)
    for layer in layers:
        bounds = network.rhos[layer].bounds
        nudged = nudge is not None and layer == network.driven
        if nudged:  # unclipped where convex, a bound where concave: the projection below covers both
            curvature = curvature if curvature is not None else nudge_curvature(nudge, beta_scale, fields[layer])
            new = nudged_minimiser(fields[layer], nudge, beta_scale, bounds, curvature, clip=False)
        else:
            new = fields[layer]
        if omega != 1.0:
            moved = torch.lerp(s[layer], new, omega)
            new = on_concave_rows(moved, new, curvature) if nudged else moved
        if bounds is not None:
            new = new.clamp(*bounds)
        if inplace:
            s[layer].copy_(new)
        else:
            s[layer] = new
        rates[layer] = network.rhos[layer].rho(s[layer])


def on_concave_rows(moved: Tensor, minimiser: Tensor, curvature: tuple) -> Tensor:
    """``moved`` (an over-relaxed step), except on examples whose nudged block is concave (a <= 0): there the
    minimiser is a bound, and stopping short of it (omega < 1) could climb over the hump; take it exactly."""
    a, convex = curvature
    if convex:
        return moved
    if not isinstance(a, Tensor):
        return minimiser
    return torch.where(a > 0, moved, minimiser)


def nudge_curvature(nudge, beta_scale: float, like: Tensor) -> tuple[float | Tensor, bool]:
    """(a, convex): the curvature a = 1 + beta' of the driven layer's box problem in ``like``'s dtype and device
    (a Python float for a scalar beta, exact in every dtype; a (batch, 1) tensor for a per-example beta), and
    whether a > 0 everywhere. The per-example test reads the device once: call it once per phase, not per sweep."""
    if isinstance(nudge.beta, Tensor):
        a = (1.0 + nudge.beta[:, None] * beta_scale).to(dtype=like.dtype, device=like.device)
        return a, bool((a > 0).all())
    a = 1.0 + float(nudge.beta) * beta_scale
    return a, a > 0


def nudged_minimiser(h: Tensor, nudge, beta_scale: float, bounds, curvature: tuple | None = None,
                      clip: bool = True) -> Tensor:
    """argmin over the box of 1/2 a s^2 - b s with a = 1 + beta', b = h + beta' d.

    For a <= 0 (a negative nudge beta' <= -1) the function is concave or linear and its minimum
    sits on a bound: the one with the lower value. No host sync when ``curvature`` is given.
    ``clip=False``: where a > 0, the unconstrained minimiser b / a (over-relaxation projects afterwards).
    """
    a, convex = curvature if curvature is not None else nudge_curvature(nudge, beta_scale, h)
    beta = nudge.beta[:, None] if isinstance(nudge.beta, Tensor) else float(nudge.beta)
    b = h + beta * beta_scale * nudge.target
    box = bounds if clip else None
    if convex:
        new = b / a
        return new.clamp(*box) if box is not None else new
    if bounds is None:
        raise ValueError("the nudged output is unbounded below for beta <= -1 with a linear output; "
                         "use |beta| < 1 or method='euler'")
    lo, hi = bounds
    value = lambda v: 0.5 * a * v * v - b * v  # noqa: E731
    on_bound = torch.where(value(hi) < value(lo), torch.full_like(b, hi), torch.full_like(b, lo))
    if not isinstance(a, Tensor):  # one curvature for the whole batch, and it is <= 0
        return on_bound
    convex_part = b / a.clamp_min(torch.finfo(h.dtype).tiny)
    return torch.where(a > 0, convex_part.clamp(lo, hi) if clip else convex_part, on_bound)


def parity_groups(layers: Sequence[int]) -> list[list[int]]:
    even = [layer for layer in layers if layer % 2 == 0]
    odd = [layer for layer in layers if layer % 2 == 1]
    return [group for group in (even, odd) if group]


def max_change(before: Sequence[Tensor], after: Sequence[Tensor], layers: Sequence[int]) -> float:
    """max |after - before| over the given layers (convergence measure of the block solver); one host sync."""
    worst = [(after[layer] - before[layer]).abs().max() for layer in layers if after[layer].numel()]
    return device_max(worst)


def device_max(values: Sequence[Tensor]) -> float:
    """The largest of some 0-d tensors as a float, read from the device once (not once per tensor)."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    if len({(v.dtype, v.device) for v in values}) > 1:
        return max(float(v) for v in values)
    return float(torch.stack(list(values)).max())
