"""Gradient-descending updates (ER19; THEORY §3.3): exact for the energy-based map (T9), approximate for the
prototypical map s <- sigma(dPhi/ds) (T14)."""

from __future__ import annotations

import math

import pytest
import torch

from earlyprop.experiments.gdu import gdu
from earlyprop.experiments.prototypical import prototypical_fixed_point, prototypical_gdu, prototypical_step

T9_STEPS = 15


@pytest.fixture(scope="module")
def t9(rc):
    return gdu(rc.net, rc.x, rc.d, beta=1e-6, eps=0.2, steps=T9_STEPS, nudge_scale="none", state=rc.state)


def arrival_step(rc, name):
    """First t at which Delta(t) may be non-zero: the distance of the nearest free layer the tensor touches."""
    if name.startswith("layer"):
        return rc.dist[int(name[len("layer"):])]
    net = rc.net
    if name.startswith("biases."):
        return rc.dist[net.free[int(name.split(".")[1])]]
    term = net.interactions[int(name.split(".")[1])]
    return min(rc.dist[m] for m in term.layers if m in rc.dist)


# ------------------------------------------------------------------------------------------------ T9
def test_t9_ep_increments_match_bptt_gradients_at_every_step(rc, t9):
    assert set(t9.ep) == {f"layer{m}" for m in rc.net.free} | {n for n, _ in rc.net.named_parameters()}
    for name in t9.ep:
        ep, ref = t9.ep[name].flatten(1), t9.bptt[name].flatten(1)  # (steps, everything else)
        for t in range(T9_STEPS):
            if bool((ref[t] == 0).all()):
                assert bool((ep[t] == 0).all()), (name, t)  # both sides silent before the signal arrives
            else:
                assert float((ep[t] - ref[t]).norm() / ref[t].norm()) <= 1e-4, (name, t)
    assert t9.summary()["max_rel_rmse"] <= 1e-4
    assert t9.summary()["sign_error"] == 0.0


def test_t9_parameter_updates_are_exactly_zero_until_the_signal_arrives(rc, t9):
    for name in t9.ep:
        k = arrival_step(rc, name)
        ep = t9.ep[name].flatten(1)
        for t in range(k):
            assert bool((ep[t] == 0).all()), (name, t)
        assert bool((ep[k] != 0).any()), (name, k)
    # THEORY's example: W_1 (layers 1-2) is exactly 0 at t = 0, 1 and moves at t = 2
    w1 = t9.ep["interactions.1.weight"].flatten(1)
    assert rc.net.interactions[1].layers == (1, 2)
    assert bool((w1[:2] == 0).all()) and bool((w1[2] != 0).any())


# ----------------------------------------------------------------------------------------------- T14
T14_STEPS = 10


@pytest.fixture(scope="module")
def t14(rc):
    return prototypical_gdu(rc.net, rc.x, rc.d, beta=1e-6, steps=T14_STEPS)


def test_t14_prototypical_fixed_point_and_nudge_outside_sigma(rc):
    state = prototypical_fixed_point(rc.net, rc.x)
    with torch.no_grad():
        again = prototypical_step(rc.net, state)
        nudged = prototypical_step(rc.net, state, beta=0.5, target=rc.d)
    assert max(float((a - b).abs().max()) for a, b in zip(again, state)) <= 1e-14
    # only the driven layer feels the nudge, and outside sigma: s_out <- sigma(.) + beta (d - s_out)
    out = rc.net.driven
    assert torch.allclose(nudged[out], again[out] + 0.5 * (rc.d - state[out]), rtol=0, atol=1e-15)
    assert all(torch.equal(nudged[m], again[m]) for m in rc.net.free if m != out)


def test_t14_gdu_is_exact_at_t0(t14):
    assert abs(t14.cosines[0] - 1) <= 1e-12


def test_t14_gdu_is_only_approximate_afterwards(t14):
    """The map's Jacobian diag(sigma') W is not symmetric: later steps are not aligned to 1e-3 (contrast T9),
    while the accumulated update sum_{tau <= t} Delta(tau), which a learning rule integrates, stays aligned."""
    assert min(t14.cosines[1:]) < 1 - 1e-3
    assert all(c >= 0.85 for c in t14.cumulative_cosines), t14.cumulative_cosines
    assert all(math.isfinite(c) for c in t14.cosines)


@pytest.mark.xfail(strict=True, reason="THEORY T14's per-step bound (>= 0.85 for every t >= 1; observed 0.89-0.97) "
                   "holds for one draw only: on this RC batch 3 of 4 examples drop below it (down to -0.92 by "
                   "t = 8; in a sample of 256 inputs, 29% satisfy it up to K = 10). J = diag(sigma') W and J^T "
                   "share eigenvalues, so J^t e and (J^T)^t e approach D^(1/2) v and D^(-1/2) v, whose signs can "
                   "differ")
def test_t14_theory_per_step_bound(t14):
    assert all(c >= 0.85 for c in t14.cosines[1:])
