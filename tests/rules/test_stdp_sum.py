"""The STDP rule's sum over the nudged steps (BF-17) computed as it telescopes: where a step's product is a
difference (tied form, biases) or has a clamped partner, A(nu) comes from the phase's ends; the result must be the
step-by-step sum, to round-off (float64)."""

from __future__ import annotations

import pytest
import torch

from earlyprop import Network
from earlyprop.dynamics import relax
from earlyprop.rules import STDP, STDP_FORMS
from earlyprop.rules.contrastive import _closeness


def stepwise(rule: STDP, network: Network, trajectory, weights):
    """A(nu) the long way: every step's products for every term, summed (the rule's own per-step formulas)."""
    rank = _closeness(network)
    total = {id(p): torch.zeros_like(p) for p in network.parameters()}
    for before, after in zip(trajectory[:-1], trajectory[1:]):
        r0, r1 = network.rates(before), network.rates(after)
        change = rule._post_change(network, before, after, r0, r1, weights)
        for term in network.interactions:
            total[id(term.weight)] += rule._term_update(term, r0, r1, change, rank, weights)
        for layer in network.free:
            total[id(network.bias(layer))] += change[layer].mean(0)
    return [total[id(p)] for p in network.parameters()]


@pytest.mark.parametrize("form", STDP_FORMS)
@pytest.mark.parametrize("extras", [dict(), dict(skip=[(0, 2)]), dict(lateral=[1])])
@pytest.mark.parametrize("per_example", [False, True])
def test_the_telescoped_sum_is_the_stepwise_sum(form, extras, per_example):
    net = Network.layered([7, 6, 5, 3], "hard_sigmoid", seed=0, bias_std=0.3, gain=1.5, dtype=torch.float64,
                          **extras)
    if "lateral" in extras:
        with torch.no_grad():  # lateral matrices start at zero: give this one something to do
            net.interactions[-1].weight.copy_(0.2 * torch.randn(6, 6, generator=torch.Generator().manual_seed(1),
                                                                dtype=torch.float64))
            net.interactions[-1].weight.copy_(net.interactions[-1].weight + net.interactions[-1].weight.T)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 7, generator=gen, dtype=torch.float64)
    d = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    free, _ = relax(net, net.init_state(x), steps=20, eps=0.5, project=True)
    _, diag = relax(net, free, steps=6, eps=0.5, beta=0.8, target=d, project=True, record_trajectory=True)
    weights = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64) if per_example else \
        torch.full((4,), 1.25, dtype=torch.float64)
    rule = STDP(0.8, form)
    fast, slow = rule.accumulate(net, diag.trajectory, weights), stepwise(rule, net, diag.trajectory, weights)
    assert all(float(g.abs().max()) > 0 for g in slow[:2])  # the phase moved: a sum that means something
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-13


@pytest.mark.parametrize("form,calls", [("plain", 1 + 2 * 6), ("xie_seung", 1 + 2 * 6), ("tied", 3)])
def test_the_input_coupling_costs_one_product_per_phase(form, calls, monkeypatch):
    """On 784-500-10 the input coupling is the large product: it is formed once per phase, not once per step (the
    free-free couplings of the plain and Xie-Seung forms, step by step; all of the tied form's, once)."""
    net = Network.layered([7, 6, 5, 3], "hard_sigmoid", seed=0, dtype=torch.float64)
    x = torch.rand(4, 7, dtype=torch.float64)
    _, diag = relax(net, net.init_state(x), steps=6, eps=0.5, beta=0.8, target=torch.rand(4, 3, dtype=torch.float64),
                    project=True, record_trajectory=True)
    rule, made = STDP(0.8, form), []
    update = rule._term_update
    monkeypatch.setattr(rule, "_term_update", lambda term, *args: made.append(term.pre) or update(term, *args))
    rule.accumulate(net, diag.trajectory, torch.ones(4, dtype=torch.float64))
    assert len(made) == calls and made.count(0) == 1
