"""Equilibrium propagation at the fixed points (EP17 Thm 1, Prop. 2; LA21 bias orders): checks T7, T8."""

from __future__ import annotations

import copy

import pytest
import torch

from earlyprop.newton import polish

BETAS = (1e-2, 1e-3, 1e-4)


def mean_cost(net, state, d):
    return float((0.5 * ((state[net.driven] - d) ** 2).sum(-1)).mean())


def central_difference(net, term, i, j, h, rc):
    """(J(W + h e_ij) - J(W - h e_ij)) / 2h with J = mean_b C(s*(W)), each s*(W) by Newton from s*."""
    original = float(term.weight.detach()[i, j])
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            term.weight[i, j] = original + sign * h
        state, diag = polish(net, rc.state, tol=1e-15, max_iter=5)
        assert diag.residual <= 1e-14
        values.append(mean_cost(net, state, rc.d))
    with torch.no_grad():
        term.weight[i, j] = original
    return (values[0] - values[1]) / (2 * h)


@pytest.fixture(scope="module")
def ep_setup(rc):
    """Theta = W_1 (Dense(1, 2)); true dJ/dW_1 by central differences of J(W) = mean_b C(s*(W)), h = 1e-6,
    every perturbed fixed point re-solved by Newton from s*."""
    net = copy.deepcopy(rc.net)
    term = net.layered_pairs()[1]
    assert (term.pre, term.post) == (1, 2)
    index = [i for i, p in enumerate(net.parameters()) if p is term.weight][0]
    h = 1e-6
    true = torch.empty_like(term.weight)
    for i in range(term.weight.shape[0]):
        for j in range(term.weight.shape[1]):
            true[i, j] = central_difference(net, term, i, j, h, rc)
    assert torch.equal(term.weight, rc.net.layered_pairs()[1].weight)  # restored exactly

    def de_dw(state):
        return net.energy_param_grads(state)[index]

    nudged = {}
    for beta in BETAS:
        for b in (beta, -beta):
            state, diag = polish(net, rc.state, beta=b, target=rc.d, tol=1e-15, max_iter=8)
            assert diag.residual <= 1e-14
            nudged[b] = state
    return dict(net=net, true=true, de_dw=de_dw, nudged=nudged)


def estimator_errors(ep_setup, rc):
    true, de_dw, nudged = ep_setup["true"], ep_setup["de_dw"], ep_setup["nudged"]
    one_sided, symmetric = {}, {}
    for beta in BETAS:
        g_plus, g_minus, g_free = de_dw(nudged[beta]), de_dw(nudged[-beta]), de_dw(rc.state)
        one_sided[beta] = float((((g_plus - g_free) / beta) - true).norm() / true.norm())
        symmetric[beta] = float((((g_plus - g_minus) / (2 * beta)) - true).norm() / true.norm())
    return one_sided, symmetric


def test_t7_one_sided_ep_estimator_is_first_order_in_beta(ep_setup, rc):
    one_sided, _ = estimator_errors(ep_setup, rc)
    assert one_sided[1e-3] <= 1e-2
    for beta in BETAS[:-1]:
        assert 8 <= one_sided[beta] / one_sided[beta / 10] <= 12, one_sided


def test_t7_symmetric_ep_estimator_is_second_order_in_beta(ep_setup, rc):
    _, symmetric = estimator_errors(ep_setup, rc)
    assert symmetric[1e-3] <= 1e-4
    for beta in BETAS[:-1]:
        assert 80 <= symmetric[beta] / symmetric[beta / 10] <= 120, symmetric


def test_t7_finite_difference_reference_is_accurate(ep_setup, rc):
    """The reference itself: central differences with h and 2h agree far below the errors measured above."""
    net, true = ep_setup["net"], ep_setup["true"]
    term = net.layered_pairs()[1]
    i, j = 2, 3
    assert abs(central_difference(net, term, i, j, 2e-6, rc) - float(true[i, j])) <= 1e-9 * float(true.norm())


@pytest.mark.parametrize("beta", [1e-2, 1e-3])
def test_t8_nudging_lowers_the_cost_at_first_order_minus_beta_g_hinv_g(rc, th, beta):
    nudged, diag = polish(rc.net, rc.state, beta=beta, target=rc.d, tol=1e-14)
    assert diag.converged
    cost = 0.5 * ((rc.state[rc.net.driven] - rc.d) ** 2).sum(-1)
    cost_beta = 0.5 * ((nudged[rc.net.driven] - rc.d) ** 2).sum(-1)
    change = cost_beta - cost
    assert bool((change < 0).all())
    g = th.cost_gradient(rc.net, rc.state, rc.d)
    hinv_g = torch.linalg.solve(th.energy_hessian(rc.net, rc.state), g.unsqueeze(-1)).squeeze(-1)
    first_order = -beta * (g * hinv_g).sum(-1)
    assert bool((((change - first_order) / first_order).abs() <= 10 * beta).all())
