"""Noise in the relaxation loop: Langevin sampling (T11) and noise-averaged early inference (T12).

THEORY §1.2/§1.3 (BF-1, BF-2): with noise variance 2 eps T per step, the leaky-integrator update is the
Euler–Maruyama discretisation of the Langevin SDE ds = -dE/ds dt + sqrt(2T) dB, whose stationary law is
p_T(s) ~ exp(-E(s)/T); the discretisation bias is O(eps). THEORY §1.12 (A12): under noise the early-
inference signal survives in expectation; common random numbers (the free and the nudged chain see the
same noise) make the nudge-induced difference measurable with a few hundred repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

from earlyprop.cost import Cost
from earlyprop.dynamics import relax
from earlyprop.experiments.early_inference import cosine, free_fixed_point, layer_distances, layered_deltas
from earlyprop.network import Network


@dataclass
class LangevinMoments:
    """Sample moments of the chains (pooled over chains and post-burn-in steps) and the quadrature values."""

    mean: float
    variance: float
    reference_mean: float
    reference_variance: float
    samples: int


def one_unit_network(field: float = 1.5, dtype: torch.dtype = torch.float64) -> Network:
    """sizes [1, 1], tanh, zero weight and bias ``field``: E(s) = 1/2 s^2 - field * tanh(s) (T11)."""
    net = Network.layered([1, 1], "tanh", init="gaussian", seed=0, dtype=dtype)
    with torch.no_grad():
        for term in net.interactions:
            term.weight.zero_()  # the clamped input then plays no role
        net.bias(1).fill_(field)
    return net


def quadrature_moments(field: float = 1.5, temperature: float = 1.0) -> tuple[float, float]:
    """Mean and variance of p(z) ~ exp(-(z^2/2 - field tanh z) / T) by numerical integration."""

    def energy(z: float) -> float:
        return 0.5 * z * z - field * math.tanh(z)

    # shift by a bound of the minimum so that exp(-E/T) cannot overflow: E >= -|field|
    def density(z: float) -> float:
        return math.exp(-(energy(z) + abs(field)) / temperature)

    z0 = integrate.quad(density, -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
    z1 = integrate.quad(lambda z: z * density(z), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
    z2 = integrate.quad(lambda z: z * z * density(z), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
    mean = z1 / z0
    return mean, z2 / z0 - mean**2


def langevin_moments(
    *,
    eps: float = 0.02,
    temperature: float = 1.0,
    field: float = 1.5,
    chains: int = 4000,
    steps: int = 6000,
    burn_in: int = 1000,
    chunk: int = 250,
    seed: int = 0,
) -> LangevinMoments:
    """Sample E = 1/2 z^2 - field tanh z at temperature T with the relaxation loop (BF-1, T11).

    ``chains`` independent chains run as one batch from rest; after ``burn_in`` steps every later state
    is pooled (time averaging, since 4000 end-points alone give a mean only to ~0.014).
    """
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must be in [0, steps), got burn_in={burn_in}, steps={steps}")
    net = one_unit_network(field)
    gen = torch.Generator().manual_seed(seed)
    state = net.init_state(torch.ones(chains, 1, dtype=torch.float64))
    noisy = dict(eps=eps, temperature=temperature, generator=gen)
    if burn_in:
        state, _ = relax(net, state, steps=burn_in, **noisy)
    total, total_sq, count, done = 0.0, 0.0, 0, burn_in
    while done < steps:
        n = min(chunk, steps - done)
        state, diag = relax(net, state, steps=n, record_trajectory=True, **noisy)
        z = torch.stack([s[1] for s in diag.trajectory[1:]])  # (n, chains, 1)
        total += float(z.sum())
        total_sq += float((z**2).sum())
        count += z.numel()
        done += n
    mean = total / count
    ref_mean, ref_var = quadrature_moments(field, temperature)
    return LangevinMoments(mean, total_sq / count - mean**2, ref_mean, ref_var, count)


@dataclass
class NoisyLayerAlignment:
    """Early inference under noise for one layer: cosines with -delta at the first-change step.

    ``mean_cosine``: cosine of the difference averaged over the repeats (worst example);
    ``sample_cosine``: worst single repeat.
    """

    layer: int
    distance: int
    first_step: int
    mean_cosine: float
    sample_cosine: float


def noise_averaged_alignment(
    network: Network,
    x: Tensor,
    target: Tensor,
    *,
    beta: float = 1e-3,
    eps: float = 0.1,
    temperature: float = 1e-2,
    repeats: int = 200,
    seed: int = 0,
    nudge_scale: str = "eps",
    state: Sequence[Tensor] | None = None,
    cost: Cost | None = None,
) -> list[NoisyLayerAlignment]:
    """Nudged minus free chain from s* with common random numbers, averaged over ``repeats`` (T12)."""
    if beta == 0:
        raise ValueError("noise_averaged_alignment needs a non-zero beta (the nudge is the signal)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if state is None:
        state, _ = free_fixed_point(network, x)
    dist = layer_distances(network)
    deltas = layered_deltas(network, state, target, cost)
    batch = state[0].shape[0]
    # repeats are batched: row r * batch + b is repeat r of example b
    start = [s.detach().repeat(repeats, 1) for s in state]
    targets = target.repeat(repeats, *([1] * (target.dim() - 1)))
    common = dict(steps=max(dist.values()) + 1, eps=eps, temperature=temperature, nudge_scale=nudge_scale,
                  record_trajectory=True)
    # two generators with the same seed: both chains draw the same noise in the same order
    _, free = relax(network, start, generator=torch.Generator().manual_seed(seed), **common)
    _, nudged = relax(network, start, beta=beta, target=targets, cost=cost,
                      generator=torch.Generator().manual_seed(seed), **common)
    sign = math.copysign(1.0, beta)
    results = []
    for m in sorted(dist, key=lambda layer: dist[layer]):
        diffs = [sn[m] - sf[m] for sn, sf in zip(nudged.trajectory, free.trajectory)]
        moved = [t for t, d in enumerate(diffs) if bool((d != 0).any())]
        if not moved:
            continue
        t = moved[0]
        # the chains agree bit for bit before t, so this is both the displacement and the velocity
        change = diffs[t].reshape(repeats, batch, -1)
        expected = -sign * deltas[m]
        mean_cos = cosine(change.mean(0), expected)
        sample_cos = cosine(change.reshape(repeats * batch, -1), expected.repeat(repeats, 1))
        results.append(NoisyLayerAlignment(m, dist[m], t, float(mean_cos.min()), float(sample_cos.min())))
    return results
