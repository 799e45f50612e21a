"""Early inference approximates back-propagation (THEORY §1.9, BF-11..BF-15): checks T4a-d, T5, T6.

Nudged and free chains always start from the same s*, and the comparison is nudged minus free (THEORY §2).
"""

from __future__ import annotations

import math

import pytest
import torch

from earlyprop.dynamics import relax
from earlyprop.experiments.early_inference import cosine, early_inference, eps_slopes
from earlyprop.newton import polish

T4_BETA = 1e-4
T4_EPS = (0.5, 0.1, 0.02)


def chains(net, state, d, *, beta, eps, steps, nudge_scale="eps"):
    """Trajectories (lists of states, index 0 = s*) of the free and the nudged chain from ``state``."""
    common = dict(steps=steps, eps=eps, nudge_scale=nudge_scale, record_trajectory=True)
    _, free = relax(net, state, **common)
    _, nudged = relax(net, state, beta=beta, target=d, **common)
    return free.trajectory, nudged.trajectory


def roundoff_allowance(rc, layer, beta, eps, th):
    """Relative round-off floor of a first change of size beta eps^(k+1) |delta| measured as the difference
    of two O(|s*|) states: ~ u |s*|_inf sqrt(n) / (beta eps^(k+1) |delta|) per example (factor 2 for the
    few operations per step). THEORY §2: keep beta eps^(k+1) >~ 1e-9, below that round-off dominates."""
    k = rc.dist[layer]
    scale = max(float(rc.state[m].abs().max()) for m in rc.net.free)
    size = abs(beta) * eps ** (k + 1) * rc.deltas[layer].norm(dim=-1)
    return 2 * th.unit_roundoff * scale * math.sqrt(rc.net.sizes[layer]) / size


# ----------------------------------------------------------------------------------------------- T4a
@pytest.mark.parametrize("eps", T4_EPS)
def test_t4a_the_nudge_moves_one_layer_per_step(rc, eps):
    depth = max(rc.dist.values())
    free, nudged = chains(rc.net, rc.state, rc.d, beta=T4_BETA, eps=eps, steps=depth + 2)
    for layer, k in rc.dist.items():
        for t in range(k + 1):  # states s_0 .. s_k: velocities v_0 .. v_{k-1} of this layer are untouched
            assert torch.equal(nudged[t][layer], free[t][layer]), (layer, k, t)
        # and at s_{k+1} every example of the layer has moved
        assert bool((nudged[k + 1][layer] != free[k + 1][layer]).any(-1).all()), (layer, k)
    result = early_inference(rc.net, rc.x, rc.d, beta=T4_BETA, eps=eps, state=rc.state, steps=depth + 1)
    assert {a.layer: a.first_step for a in result.layers} == {m: k + 1 for m, k in rc.dist.items()}


# ----------------------------------------------------------------------------------------------- T4b
@pytest.mark.parametrize("eps", T4_EPS)
def test_t4b_first_change_is_minus_beta_eps_k_plus_1_times_layered_delta(rc, th, eps):
    depth = max(rc.dist.values())
    free, nudged = chains(rc.net, rc.state, rc.d, beta=T4_BETA, eps=eps, steps=depth + 1)
    for layer, k in rc.dist.items():
        change = nudged[k + 1][layer] - free[k + 1][layer]
        expected = -T4_BETA * eps ** (k + 1) * rc.deltas[layer]
        r = roundoff_allowance(rc, layer, T4_BETA, eps, th)
        assert bool((1 - cosine(change, expected) <= torch.clamp(r**2, min=1e-8)).all()), (layer, k)
        assert bool((th.rel_err(change, expected) <= 10 * T4_BETA + r).all()), (layer, k)


def test_t4b_roundoff_allowance_only_matters_below_the_theory_floor(rc, th):
    """The allowance above exceeds the plain tolerance only where beta eps^(k+1) < 1e-9 (THEORY §2)."""
    for eps in T4_EPS:
        for layer, k in rc.dist.items():
            r = float(roundoff_allowance(rc, layer, T4_BETA, eps, th).max())
            if T4_BETA * eps ** (k + 1) >= 1e-9:
                assert r**2 <= 1e-8 and r <= T4_BETA, (eps, layer)


# ----------------------------------------------------------------------------------------------- T4c
def test_t4c_first_change_scales_like_eps_to_the_k_plus_1(rc):
    slopes = eps_slopes(rc.net, rc.x, rc.d, eps_values=(0.2, 0.1, 0.05, 0.025), beta=1e-3, state=rc.state)
    assert set(slopes) == set(rc.dist.values())
    for k, slope in slopes.items():
        assert abs(slope - (k + 1)) <= 0.01, (k, slope)


def test_t4c_without_eps_on_the_nudge_the_exponent_is_k(rc):
    slopes = eps_slopes(rc.net, rc.x, rc.d, beta=1e-3, nudge_scale="none", state=rc.state)
    for k, slope in slopes.items():
        assert abs(slope - k) <= 0.01, (k, slope)


def test_t4c_first_change_is_linear_in_beta(rc):
    betas, eps = (1e-3, 1e-4, 1e-5), 0.2
    depth = max(rc.dist.values())
    logs = {layer: [] for layer in rc.dist}
    for beta in betas:
        free, nudged = chains(rc.net, rc.state, rc.d, beta=beta, eps=eps, steps=depth + 1)
        for layer, k in rc.dist.items():
            logs[layer].append(math.log(float((nudged[k + 1][layer] - free[k + 1][layer]).norm())))
    x = torch.tensor([math.log(b) for b in betas], dtype=torch.float64)
    for layer, ys in logs.items():
        y = torch.tensor(ys, dtype=torch.float64)
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        assert abs(slope - 1) <= 0.01, (layer, slope)


# ----------------------------------------------------------------------------------------------- T4d
T4D_BETA = 1e-6


def later_cosines(rc, eps, offsets=(1, 3, 10)):
    """cos(s^beta_{k+e} - s^0_{k+e}, -delta) per layer, offset e and example (accumulated displacement)."""
    free, nudged = chains(rc.net, rc.state, rc.d, beta=T4D_BETA, eps=eps, steps=max(rc.dist.values()) + 1 + 10)
    return {(layer, e): cosine(nudged[k + e][layer] - free[k + e][layer], -rc.deltas[layer])
            for layer, k in rc.dist.items() for e in offsets}


def test_t4d_later_displacements_stay_aligned_for_small_eps(rc):
    large, small = later_cosines(rc, 0.5), later_cosines(rc, 0.05)
    for layer in rc.dist:
        assert bool((large[layer, 1] >= 1 - 1e-8).all()), layer  # e = 1 is the first change itself
        for e in (1, 3):
            assert bool((small[layer, e] >= 0.998).all()), (layer, e)
        # the misalignment grows with eps * e: later is worse, and larger eps is worse
        assert bool((large[layer, 10] < large[layer, 3]).all() and (large[layer, 3] < large[layer, 1]).all())
        assert bool((large[layer, 10] < small[layer, 10]).all())


def test_t4d_misalignment_shrinks_at_most_linearly_with_eps(rc):
    """O(eps e): at e = 10 the angle to -delta at eps = 0.05 is 1x..3x the angle at eps = 0.02 (ratio 2.5 if
    exactly linear)."""
    a, b = later_cosines(rc, 0.05, (10,)), later_cosines(rc, 0.02, (10,))
    for layer in rc.dist:
        ratio = torch.arccos(a[layer, 10].clamp(max=1)) / torch.arccos(b[layer, 10].clamp(max=1))
        assert bool(((ratio >= 1) & (ratio <= 3)).all()), (layer, ratio)


@pytest.mark.xfail(strict=True, reason="THEORY T4d's 0.998 at eps = 0.05, e = 10 was calibrated on one draw "
                   "(observed >= 0.9988); on this RC batch one example gives 0.9974 at k = 3 (beta-independent, "
                   "so not round-off; 0.9996 at eps = 0.02)")
def test_t4d_theory_bound_at_eps_0_05_and_e_10(rc):
    small = later_cosines(rc, 0.05, (10,))
    assert all(bool((small[layer, 10] >= 0.998).all()) for layer in rc.dist)


# ------------------------------------------------------------------------------------------------ T5
def test_t5_continuous_time_response_is_the_rbp_error_signal(rc, th):
    """s(t) - s* = -beta H^-1 (I - e^{-tH}) g + O(beta^2) for eps -> 0 (SB19), at t = 2."""
    eps, beta, t = 1e-3, 1e-5, 2.0
    steps = round(t / eps)
    common = dict(steps=steps, eps=eps)
    free, _ = relax(rc.net, rc.state, **common)
    nudged, _ = relax(rc.net, rc.state, beta=beta, target=rc.d, **common)
    change = th.flat_free(rc.net, nudged) - th.flat_free(rc.net, free)
    hess = th.energy_hessian(rc.net, rc.state)
    g = th.cost_gradient(rc.net, rc.state, rc.d)
    eye = torch.eye(hess.shape[-1], dtype=torch.float64)
    decay = eye - torch.linalg.matrix_exp(-t * hess)
    expected = -beta * torch.linalg.solve(hess, (decay @ g.unsqueeze(-1))).squeeze(-1)
    assert float(th.rel_err(change, expected).max()) <= 10 * (eps + beta)


# ------------------------------------------------------------------------------------------------ T6
@pytest.mark.parametrize("beta", [1e-2, 1e-3, 1e-4])
def test_t6_nudged_fixed_point_is_minus_beta_inverse_hessian_times_g(rc, th, beta):
    nudged, diag = polish(rc.net, rc.state, beta=beta, target=rc.d, tol=1e-14)
    assert diag.converged
    change = th.flat_free(rc.net, nudged) - th.flat_free(rc.net, rc.state)
    hess = th.energy_hessian(rc.net, rc.state)
    expected = -beta * torch.linalg.solve(hess, th.cost_gradient(rc.net, rc.state, rc.d).unsqueeze(-1)).squeeze(-1)
    assert float(th.rel_err(change, expected).max()) <= 20 * beta
