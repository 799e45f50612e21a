"""Each learning rule against its definition (float64, THEORY §3.1, §3.4, §3.5, T7, T10)."""

import pytest
import torch

from earlyprop import Network
from earlyprop.experiments.early_inference import free_fixed_point
from earlyprop.rules import BPTT, STDP, Backprop, EquilibriumProp, RecurrentBackprop, Relaxation, make_rule

CONVERGED = Relaxation(eps=0.2, free_steps=0, nudge_steps=4000, project=False)


@pytest.fixture(scope="module")
def problem():
    net = Network.layered([5, 6, 5, 4, 3], "tanh", init="gaussian", gain=0.6, bias_std=0.1, seed=0,
                          dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    d = torch.rand(3, 3, generator=gen, dtype=torch.float64) - 0.5
    state, res = free_fixed_point(net, x)
    assert res < 1e-12
    return net, x, d, state


def grads_of(rule, net, x, d, state, generator=None):
    for p in net.parameters():
        p.grad = None
    rule.compute_grads(net, x, d, state=state, generator=generator)
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def true_gradient(problem):
    net, x, d, state = problem
    return grads_of(RecurrentBackprop(relaxation=CONVERGED), net, x, d, state)


def test_rbp_matches_long_bptt(problem, true_gradient):
    net, x, d, state = problem
    bptt = grads_of(BPTT(relaxation=Relaxation(eps=0.2, free_steps=2000, project=False)), net, x, d, state)
    assert rel_error(bptt, true_gradient) < 1e-8


def test_one_sided_ep_bias_is_first_order(problem, true_gradient):
    net, x, d, state = problem
    errors = [rel_error(grads_of(EquilibriumProp(b, "positive", CONVERGED), net, x, d, state), true_gradient)
              for b in (1e-2, 1e-3)]
    assert 8 <= errors[0] / errors[1] <= 12
    assert errors[1] < 1e-2


def test_negative_ep_bias_is_first_order_and_opposite(problem, true_gradient):
    net, x, d, state = problem
    pos = grads_of(EquilibriumProp(1e-2, "positive", CONVERGED), net, x, d, state) - true_gradient
    neg = grads_of(EquilibriumProp(1e-2, "negative", CONVERGED), net, x, d, state) - true_gradient
    # G(beta) - G(0) and G(0) - G(-beta) carry first-order biases of opposite sign
    assert float(pos @ neg) / float(pos.norm() * neg.norm()) < -0.99


def test_centered_ep_bias_is_second_order(problem, true_gradient):
    net, x, d, state = problem
    errors = [rel_error(grads_of(EquilibriumProp(b, "centered", CONVERGED), net, x, d, state), true_gradient)
              for b in (1e-2, 1e-3)]
    assert 80 <= errors[0] / errors[1] <= 120
    assert errors[1] < 1e-4


def test_random_sign_is_the_mean_of_per_example_one_sided_estimates(problem):
    net, x, d, state = problem
    rule = EquilibriumProp(1e-2, "random_sign", CONVERGED)
    batch = grads_of(rule, net, x, d, state, generator=torch.Generator().manual_seed(5))
    signs = rule.nudges(3, torch.Generator().manual_seed(5), torch.float64, "cpu")[1] / 1e-2
    assert set(signs.tolist()) <= {-1.0, 1.0}
    per_example = []
    for b in range(3):
        one = [s[b:b + 1] for s in state]
        variant = "positive" if signs[b] > 0 else "negative"
        sign_rule = EquilibriumProp(1e-2 * float(signs[b]), "positive", CONVERGED)
        per_example.append(grads_of(sign_rule, net, x[b:b + 1], d[b:b + 1], one))
        assert variant in ("positive", "negative")
    assert rel_error(batch, torch.stack(per_example).mean(0)) < 1e-12


def test_tied_stdp_integrates_to_the_ep_update(problem):
    net, x, d, state = problem
    rel = Relaxation(eps=0.2, free_steps=0, nudge_steps=30, project=False)
    ep = grads_of(EquilibriumProp(0.05, "centered", rel), net, x, d, state)
    tied = grads_of(STDP(0.05, "tied", "centered", rel), net, x, d, state)
    assert rel_error(tied, ep) < 1e-12


def test_plain_stdp_equals_the_analytic_sum(problem):
    net, x, d, state = problem
    beta, rel = 0.1, Relaxation(eps=0.2, free_steps=0, nudge_steps=6, project=False)
    rule = STDP(beta, "plain", "positive", rel)
    grads_of(rule, net, x, d, state)
    from earlyprop.dynamics import relax

    _, diag = relax(net, state, steps=6, eps=0.2, beta=beta, target=d, record_trajectory=True)
    traj = diag.trajectory
    w = net.layered_pairs()[1]  # layer 1 -> layer 2: post = layer 2 is closer to the output
    expected = sum((b[2] - a[2]).T @ torch.tanh(a[1]) for a, b in zip(traj[:-1], traj[1:])) / 3
    assert torch.allclose(w.weight.grad, -expected / beta, rtol=0, atol=1e-14)
    bias = net.bias(4)
    assert torch.allclose(bias.grad, -(traj[-1][4] - traj[0][4]).mean(0) / beta, atol=1e-14)


def test_plain_stdp_points_along_the_true_gradient(problem, true_gradient):
    net, x, d, state = problem
    g = grads_of(STDP(1e-3, "plain", "centered", CONVERGED), net, x, d, state)
    assert float(g @ true_gradient) / float(g.norm() * true_gradient.norm()) > 0.95


def test_backprop_rule_is_the_feedforward_mlp(problem):
    net, x, d, _ = problem
    rule = Backprop()
    y = rule.forward(net, x)
    u = x
    for term in net.layered_pairs():
        u = torch.tanh(u) @ term.weight.T + net.bias(term.post)
    assert torch.equal(y, u)
    g = grads_of(rule, net, x, d, None)
    assert torch.isfinite(g).all() and g.norm() > 0


def test_gradients_accumulate_like_backward(problem):
    net, x, d, state = problem
    rule = EquilibriumProp(1e-2, "centered", CONVERGED)
    once = grads_of(rule, net, x, d, state)
    rule.compute_grads(net, x, d, state=state)
    twice = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.allclose(twice, 2 * once, atol=1e-14)


def test_make_rule_names_and_errors():
    assert make_rule("ep-symmetric").variant == "centered"
    assert make_rule("ep-random-sign").variant == "random_sign"
    assert make_rule("stdp").form == "plain"
    assert make_rule("stdp-random-sign").variant == "random_sign"
    with pytest.raises(ValueError, match="unknown rule"):
        make_rule("hebb")
    with pytest.raises(ValueError, match="beta"):
        make_rule("ep", beta=0.0)
    with pytest.raises(ValueError, match="variant"):
        EquilibriumProp(1.0, "sideways")
