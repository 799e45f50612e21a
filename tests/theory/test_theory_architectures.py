"""Beyond the layered chain: a lateral term and skip connections keep the gradient identity (T1), the
symmetric Jacobian (T2) and exact early inference (T4a/b), with distances taken from the interaction graph."""

from __future__ import annotations

import pytest
import torch

from earlyprop.experiments.early_inference import early_inference
from earlyprop.interactions import Lateral

VARIANTS = {
    # the skip from the clamped input changes no distance; the one between free layers does
    "lateral+skip(0,2)": dict(skip=[(0, 2)], lateral=[2]),
    "lateral+skip(0,2)+skip(1,3)": dict(skip=[(0, 2), (1, 3)], lateral=[2]),
}
EXPECTED_DISTANCES = {
    "lateral+skip(0,2)": {4: 0, 3: 1, 2: 2, 1: 3},
    "lateral+skip(0,2)+skip(1,3)": {4: 0, 3: 1, 2: 2, 1: 2},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, th):
    net = th.rc_network(**VARIANTS[request.param])
    gen = torch.Generator().manual_seed(7)
    for term in net.interactions:
        if isinstance(term, Lateral):
            m = torch.randn(term.weight.shape, generator=gen, dtype=torch.float64) * 0.3
            with torch.no_grad():
                term.weight.copy_((m + m.T).fill_diagonal_(0.0))
    x, d = th.rc_data()
    ref = th.build_reference(net, x, d)
    return request.param, ref


def test_distances_come_from_the_interaction_graph(variant):
    name, ref = variant
    assert ref.dist == EXPECTED_DISTANCES[name]


def test_t1_t2_hold_with_lateral_and_skip_terms(variant, th):
    _, ref = variant
    net = ref.net
    state = th.random_free_state(net, ref.x)
    force = th.force_of_free(net, state)(th.flat_free(net, state)).detach()
    assert float((th.autograd_energy_gradient(net, state) + force).abs().max()) <= 1e-12
    assert float(th.jacobian_asymmetry(net, state).max()) <= 1e-12


@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_early_inference_is_exact_at_the_first_step_with_lateral_and_skip_terms(variant, eps):
    _, ref = variant
    assert ref.residual <= 1e-12
    beta = 1e-4
    result = early_inference(ref.net, ref.x, ref.d, beta=beta, eps=eps, state=ref.state)
    assert {a.layer for a in result.layers} == set(ref.dist)
    for a in result.layers:
        assert a.distance == ref.dist[a.layer]
        assert a.first_step == a.distance + 1
        assert a.cosine >= 1 - 1e-8, a
        assert abs(a.magnitude_ratio - 1) <= 10 * beta, a


def test_fields_of_some_layers_equal_those_of_the_full_evaluation(variant, th):
    """``fields(targets=...)`` evaluates only the rates and terms that touch the targets (the prediction's
    tie-break asks for the driven layer's alone): the same fields, with or without the static part given."""
    _, ref = variant
    net = ref.net
    state = th.random_free_state(net, ref.x)
    full = net.fields(state)
    static = net.static_fields(state)
    for layer in net.free:
        for given in (None, static):
            assert torch.equal(net.fields(state, static=given, targets=[layer])[layer], full[layer])
