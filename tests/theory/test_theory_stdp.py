"""STDP-like updates during early inference (THEORY §1.10, T10) and, for the hard sigmoid, layered deltas
equal ordinary feed-forward backprop (THEORY §1.9 ref C, T13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earlyprop.experiments.early_inference import layered_deltas
from earlyprop.experiments.stdp_alignment import stdp_alignment

T10_EPS, T10_BETA = 0.05, 1e-5


# ----------------------------------------------------------------------------------------------- T10
def test_t10_stdp_rules_align_with_layered_backprop_tanh(rc):
    rows = stdp_alignment(rc.net, rc.x, rc.d, beta=T10_BETA, eps=T10_EPS, state=rc.state)
    assert [(r.pre, r.post) for r in rows] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for r in rows:
        assert r.first_step == r.distance + 1 == rc.dist[r.post] + 1
        assert r.plain >= 0.98 and r.plain_batch >= 0.98, r
        assert r.xie_seung >= 1 - 1e-8 and r.xie_seung_batch >= 1 - 1e-8, r
    # the rho'(s_post) factor is what separates the two forms for a smooth rho
    assert min(r.plain for r in rows) < 1 - 1e-6


@pytest.fixture(scope="module")
def hard_sigmoid_reference(th):
    """A hard-sigmoid RC variant whose fixed point lies inside (0, 1), away from the kinks (THEORY A5):
    weights N(0, 0.2^2 / fan_in), biases 0.5 + N(0, 0.05^2), x ~ U(0, 1)."""
    net = th.rc_network("hard_sigmoid", gain=0.2, bias_std=0.05)
    with torch.no_grad():
        for b in net.biases:
            b.add_(0.5)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0, 1, (4, 5)))
    d = torch.tensor(rng.uniform(0.25, 0.75, (4, 3)))
    ref = th.build_reference(net, x, d)
    assert ref.residual <= 1e-12
    assert all(float(ref.state[m].min()) > 0.05 and float(ref.state[m].max()) < 0.95 for m in net.free)
    return ref


def test_t10_plain_stdp_rule_is_exact_for_the_hard_sigmoid(hard_sigmoid_reference):
    """rho' in {0, 1} gives rho'^2 = rho', so sdot rho(pre) is the layered gradient direction. Inside (0, 1) the
    dynamics is linear (rho'' = 0), so the first change has no O(beta^2) part and beta = 1e-2 is exact; with
    beta = 1e-5 the deepest first change, beta eps^4 |delta_1| ~ 1e-14, would sit below round-off (THEORY §2)."""
    ref = hard_sigmoid_reference
    rows = stdp_alignment(ref.net, ref.x, ref.d, beta=1e-2, eps=T10_EPS, state=ref.state)
    assert len(rows) == 4
    for r in rows:
        assert r.first_step == r.distance + 1
        assert r.plain >= 1 - 1e-8 and r.plain_batch >= 1 - 1e-8, r
        assert r.xie_seung >= 1 - 1e-8, r


# ----------------------------------------------------------------------------------------------- T13
def feedforward_backprop(net, state, d):
    """Ref C: ordinary backprop through u_{l+1} = W_l rho(u_l) + b_{l+1} with every local Jacobian taken at
    the given potentials, loss C = 1/2 ||rho(y) - d||^2 on the output rate. Returns dC/du_l per free layer."""
    pairs = {t.post: t for t in net.layered_pairs()}
    out = net.driven
    with torch.enable_grad():
        y = state[out].detach().requires_grad_(True)
        (upper,) = torch.autograd.grad(0.5 * ((net.rhos[out].rho(y) - d) ** 2).sum(), y)
        grads = {out: upper}
        for post in range(out, 1, -1):
            term, pre = pairs[post], post - 1
            u = state[pre].detach().requires_grad_(True)
            forward = net.rhos[pre].rho(u) @ term.weight.T + net.bias(post)
            (upper,) = torch.autograd.grad((forward * upper).sum(), u)
            grads[pre] = upper
    return grads


def random_potentials(net, x, seed=5):
    gen = torch.Generator().manual_seed(seed)
    state = net.init_state(x)
    for m in net.free:  # U(-0.5, 1.5): about half of the units saturated (rho' = 0) for the hard sigmoid
        state[m] = torch.rand(state[m].shape, generator=gen, dtype=torch.float64) * 2 - 0.5
    return state


def test_t13_hard_sigmoid_layered_deltas_equal_feedforward_backprop(rc, th):
    net = th.rc_network("hard_sigmoid")
    state = random_potentials(net, rc.x)
    saturated = [float((net.rhos[m].rho_prime(state[m]) == 0).double().mean()) for m in net.free]
    assert all(0 < f < 1 for f in saturated)  # both regimes occur: the check is not the linear case
    ref_a = layered_deltas(net, state, rc.d)
    ref_c = feedforward_backprop(net, state, rc.d)
    hidden = [m for m in net.free if m != net.driven]
    assert all(bool(ref_a[m].abs().max() > 0) for m in hidden)
    assert max(float((ref_a[m] - ref_c[m]).abs().max()) for m in hidden) <= 1e-15


def test_t13_negative_control_smooth_rho_differs_from_feedforward_backprop(rc):
    state = random_potentials(rc.net, rc.x)
    ref_a = layered_deltas(rc.net, state, rc.d)
    ref_c = feedforward_backprop(rc.net, state, rc.d)
    hidden = [m for m in rc.net.free if m != rc.net.driven]
    assert max(float((ref_a[m] - ref_c[m]).abs().max()) for m in hidden) > 1e-6
