"""The anchors' replicas (earlyprop.replicas) compute the gradient earlyprop computes for the same budget.

``earlyprop bench`` times each replica beside our step; these tests make that a comparison of two computations
of one number (float64), so a replica cannot be fast or slow by computing something else.
"""

import pytest
import torch

from earlyprop.bench import CONFIGS, build_ep, make_rho
from earlyprop.dynamics import residual
from earlyprop.network import Network
from earlyprop.replicas import ER19Step, LA21Step, RAIN23Step, build_replica
from earlyprop.rules import EquilibriumProp, Relaxation

F64 = torch.float64


def batch(sizes, n=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, sizes[0], generator=gen, dtype=F64)
    y = torch.nn.functional.one_hot(torch.randint(0, sizes[-1], (n,), generator=gen), sizes[-1]).to(F64)
    return x, y


def our_grads(net, rule, x, y):
    for p in net.parameters():
        p.grad = None
    rule.compute_grads(net, x, y)
    return [p.grad.clone() for p in net.parameters()]


def replica_grads(net, replica, x, y):
    for p in net.parameters():
        p.grad = None
    replica.compute_grads(x, y)
    return [p.grad.clone() for p in net.parameters()]


def assert_same_grads(ours, theirs, rtol):
    scale = max(float(g.abs().max()) for g in ours)
    assert scale > 1e-3  # a gradient that is there to compare
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= rtol * scale


@pytest.mark.parametrize("sizes", [(20, 12, 5), (20, 12, 9, 5)])
def test_la21_is_our_euler_step_at_eps_one(sizes):
    """s <- clip(dPhi/ds) by autograd is our projected Euler step with eps = 1 (hard-sigmoid rates)."""
    net = Network.layered(sizes, "hard_sigmoid", bias_std=0.3, dtype=F64)
    x, y = batch(sizes)
    rule = EquilibriumProp(0.5, "positive", Relaxation(eps=1.0, free_steps=15, nudge_steps=6, project=True))
    assert_same_grads(our_grads(net, rule, x, y), replica_grads(net, LA21Step(net, 15, 6, 0.5), x, y), 1e-12)


@pytest.mark.parametrize("sizes", [(20, 12, 5), (20, 12, 9, 5)])
def test_er19_is_our_leaky_integrator(sizes):
    """ER19's continuous-time step with rho' on every layer and no clipping is our Euler step (eps = dt, the nudge
    scaled by dt, logistic rates on every layer, the input's included)."""
    net = Network.layered(sizes, make_rho("sigmoid4"), bias_std=0.3, dtype=F64)
    x, y = batch(sizes)
    rule = EquilibriumProp(0.5, "positive", Relaxation(eps=0.2, free_steps=40, nudge_steps=6, project=False))
    replica = ER19Step(net, 40, 6, 0.2, 0.5, output_rho_prime=True, clamp=False)
    assert_same_grads(our_grads(net, rule, x, y), replica_grads(net, replica, x, y), 1e-12)


def test_er19_own_choices_change_the_gradient():
    """The timed replica keeps ER19's linear-looking output dynamics and clipping: a different computation (so
    the flags above are what makes the match, not an accident of the data)."""
    sizes = (20, 12, 5)
    net = Network.layered(sizes, make_rho("sigmoid4"), bias_std=0.3, dtype=F64)
    x, y = batch(sizes)
    exact = replica_grads(net, ER19Step(net, 40, 6, 0.2, 0.5, output_rho_prime=True, clamp=False), x, y)
    own = replica_grads(net, ER19Step(net, 40, 6, 0.2, 0.5), x, y)
    assert all(torch.isfinite(g).all() for g in own)
    assert max(float((a - b).abs().max()) for a, b in zip(exact, own)) > 1e-4


@pytest.mark.parametrize("output", ["linear", "hard_sigmoid"])
def test_rain23_reaches_our_centered_ep_gradient(output):
    """RAIN23's block updates (its output iteration y <- rho(field - beta (y - d)) is not our exact minimiser) reach
    the fixed points of our asynchronous solver: the same centered EP gradient once both have converged."""
    sizes = (20, 12, 5)
    net = Network.layered(sizes, "hard_sigmoid", output_rho=output, bias_std=0.3, dtype=F64)
    x, y = batch(sizes)
    rule = EquilibriumProp(0.2, "centered", Relaxation(free_steps=300, nudge_steps=300, method="async"))
    ours = our_grads(net, rule, x, y)
    assert_same_grads(ours, replica_grads(net, RAIN23Step(net, 300, 300, 0.2), x, y), 1e-10)
    few = replica_grads(net, RAIN23Step(net, 15, 15, 0.2), x, y)  # bench's budget: not converged yet
    assert max(float((a - b).abs().max()) for a, b in zip(ours, few)) > 1e-6


def test_rain23_free_state_is_our_fixed_point():
    """On a deeper chain its update order ([h1, y] then [h2]) may pick another minimum than ours ([h2] then
    [h1, y]); it is a fixed point of our projected dynamics all the same."""
    sizes = (20, 12, 9, 5)
    net = Network.layered(sizes, "hard_sigmoid", output_rho="linear", bias_std=0.3, dtype=F64)
    x, _ = batch(sizes)
    replica = RAIN23Step(net, 300, 300, 0.2)
    with torch.no_grad():
        replica.layers[0].state = x
        for layer, n in zip(replica.layers[1:], sizes[1:]):
            layer.state = torch.zeros(x.shape[0], n, dtype=F64)
        replica.minimise(replica.terms, 300)
    state = [layer.state for layer in replica.layers]
    assert residual(net, state, project=True) <= 1e-12
    assert float(state[2].abs().max()) > 0.1  # not the trivial zero state


def test_each_speed_config_with_an_anchor_has_its_replica():
    kinds = {name: type(build_replica(CONFIGS[name], build_ep(CONFIGS[name], torch.device("cpu"))[0])).__name__
             for name in "ABCD"}
    assert kinds == {"A": "LA21Step", "B": "RAIN23Step", "C": "ER19Step", "D": "NoneType"}
    with pytest.raises(ValueError, match="logistic"):
        ER19Step(Network.layered((6, 4, 3), "hard_sigmoid"), 1, 1, 0.2, 0.1)
