"""EP's and the STDP rule's training step in one compiled call (earlyprop.native_step) changes speed, never results
(issue 4).

Each case runs ``EquilibriumProp.compute_grads`` twice on the same plain chain: through the compiled step
(counted, so a silent fallback fails the test) and through the general path of ``relax`` (the compiled step
switched off), and compares the gradients, the free state, the prediction and the cost in float64.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import earlyprop.native as native
import earlyprop.native_step as native_step
import earlyprop.small_gemm as small_gemm
import earlyprop.step_plan as step_plan
from earlyprop.dynamics import DivergenceError
from earlyprop.network import Network
from earlyprop.nonlinearity import Nonlinearity, Sigmoid
from earlyprop.rules import STDP, STDP_FORMS, EquilibriumProp, Relaxation

pytestmark = pytest.mark.skipif(not native.available(), reason="numba is not installed: no compiled kernels here "
                                "(pip install numba); the general path is tested everywhere else")
TOL = 1e-12
SMALL, DEEP = (12, 9, 4), (12, 9, 7, 5, 4)


def data(sizes, batch=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, sizes[0], generator=gen, dtype=dtype)
    d = torch.nn.functional.one_hot(torch.randint(0, sizes[-1], (batch,), generator=gen), sizes[-1]).to(dtype)
    return x, d


@pytest.fixture
def counted(monkeypatch):
    """The number of compiled steps run so far (a list that grows by one per call of native_step.ep_step)."""
    calls, kernel = [], native_step.ep_step
    monkeypatch.setattr(native_step, "ep_step", lambda *args: calls.append(1) or kernel(*args))
    return calls


@pytest.fixture(params=["torch", "in place"])
def drive(request, monkeypatch):
    """x's drive b_1 + rho(x) W_1^T by torch, or by earlyprop.small_gemm's product that reads W_1 in place (forced
    on, whatever the CPU and the thread count: its sums are the same everywhere); then it must have run."""
    if request.param == "torch":
        monkeypatch.setattr(small_gemm, "available", lambda: False)
        yield request.param
        return
    if not small_gemm.installed():
        pytest.skip("llvmlite is not installed: no in-place product")
    monkeypatch.setattr(small_gemm, "available", lambda: True)
    calls, make = [], small_gemm.transposed_kernels

    def counted_kernels(*shape):
        kernels = make(*shape)
        return tuple((lambda *p, k=k: calls.append(1) or k(*p)) for k in kernels)

    monkeypatch.setattr(small_gemm, "transposed_kernels", counted_kernels)
    yield request.param
    assert calls


def both(rule, net, x, d, state=None, seed=3, monkeypatch=None):
    """(compiled, general): each a (StepResult, gradients) of one compute_grads from zero gradients."""
    out = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(step_plan, "compiled_step", lambda *args, **kwargs: None)
        net.zero_grad(set_to_none=True)
        result = rule.compute_grads(net, x, d, state, generator=torch.Generator().manual_seed(seed))
        out.append((result, [p.grad.clone() for p in net.parameters()]))
    return out


def assert_close(a, b, tol=TOL):
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype
        assert float((u - v).abs().max()) <= tol


@pytest.mark.parametrize("sizes", [SMALL, DEEP])
@pytest.mark.parametrize("variant", ["positive", "negative", "centered", "random_sign"])
@pytest.mark.parametrize("rho,settings", [
    ("hard_sigmoid", dict(method="euler")),
    ("hard_sigmoid", dict(method="euler", project=False)),
    ("hard_sigmoid", dict(method="async")),
    ("hard_sigmoid", dict(method="async", omega=1.5)),
    (Sigmoid(4.0, 0.5), dict(method="euler", eps=0.2, project=False, nudge_scale="none")),  # ER19 (config C)
    ("tanh", dict(method="euler", project=False)),
    ("hard_sigmoid", dict(method="euler", tol=0.5, check_every=4)),  # stops early: steps taken as relax's
    ("hard_sigmoid", dict(method="async", tol=0.1, check_every=3)),
])
def test_the_compiled_step_is_the_general_step(sizes, variant, rho, settings, counted, drive, monkeypatch):
    rule = EquilibriumProp(0.5, variant, Relaxation(**{"eps": 0.5, "free_steps": 15, "nudge_steps": 6} | settings))
    fast, x = compare_steps(rule, sizes, rho, counted, monkeypatch)
    assert fast.free_steps == 15 if "tol" not in settings else fast.free_steps < 15
    assert fast.free_state[0] is x  # the input itself, as the general path returns it


def compare_steps(rule, sizes, rho, counted, monkeypatch):
    """One compute_grads through the compiled step (counted) and one through the general path, compared; returns
    the compiled step's result and the input."""
    net = Network.layered(sizes, rho, dtype=torch.float64, bias_std=0.2, gain=1.5, seed=1)
    x, d = data(sizes)
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, x, d, monkeypatch=monkeypatch)
    assert len(counted) == 1
    assert_close(fast_grads, slow_grads)
    assert_close(fast.free_state, slow.free_state)
    assert_close([fast.cost], [slow.cost])
    assert torch.equal(fast.prediction, slow.prediction) and fast.free_steps == slow.free_steps
    return fast, x


@pytest.mark.parametrize("sizes", [SMALL, DEEP])
@pytest.mark.parametrize("form", STDP_FORMS)
@pytest.mark.parametrize("variant", ["positive", "centered", "random_sign"])
@pytest.mark.parametrize("rho,settings", [
    ("hard_sigmoid", dict(method="euler")),
    ("hard_sigmoid", dict(method="async")),  # the free phase by block sweeps, the nudged ones Euler (BF-17)
    (Sigmoid(4.0, 0.5), dict(method="euler", eps=0.2, project=False, nudge_scale="none")),
    ("tanh", dict(method="euler", project=False, tol=0.5, check_every=4)),
])
def test_the_compiled_stdp_step_is_the_general_step(sizes, form, variant, rho, settings, counted, drive,
                                                   monkeypatch):
    """The seed's rule: the step-by-step products of the free-free couplings and the telescoped rest (BF-17)."""
    rule = STDP(0.5, form, variant, Relaxation(**{"eps": 0.5, "free_steps": 15, "nudge_steps": 6} | settings))
    compare_steps(rule, sizes, rho, counted, monkeypatch)


def test_from_a_given_state_and_into_existing_grads(counted, monkeypatch):
    """Persistent particles: the free phase starts at a given state; gradients add to what .grad holds."""
    net = Network.layered(DEEP, "hard_sigmoid", dtype=torch.float64, bias_std=0.2, gain=1.5, seed=2)
    x, d = data(DEEP)
    start = net.init_state(x)
    for k in range(1, len(DEEP)):
        start[k] = torch.rand(x.shape[0], DEEP[k], dtype=torch.float64)
    rule = EquilibriumProp(0.5, "centered", Relaxation(free_steps=4, nudge_steps=3))
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, x, d, state=start, monkeypatch=monkeypatch)
    assert len(counted) == 1
    assert_close(fast_grads, slow_grads)
    assert_close(fast.free_state, slow.free_state)
    net.zero_grad(set_to_none=True)
    monkeypatch.undo()
    rule.compute_grads(net, x, d, start)
    rule.compute_grads(net, x, d, start)
    assert_close([p.grad for p in net.parameters()], [2 * g for g in fast_grads])


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_small_batches_leave_the_parameters_alone(batch, counted, drive, monkeypatch):
    """At any batch size, one example included, the step reads the parameters and writes only their .grad."""
    net = Network.layered(DEEP, "hard_sigmoid", bias_std=0.3, seed=4, dtype=torch.float64)
    before = [p.detach().clone() for p in net.parameters()]
    x, d = data(DEEP, batch=batch)
    rule = EquilibriumProp(0.5, "centered", Relaxation(eps=0.5, free_steps=15, nudge_steps=6))
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, x, d, monkeypatch=monkeypatch)
    assert counted and all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert_close(fast_grads, slow_grads)
    assert_close(fast.free_state[1:], slow.free_state[1:])


def test_float32_agrees_to_its_round_off(counted, drive, monkeypatch):
    net = Network.layered((64, 30, 10), "hard_sigmoid", dtype=torch.float32, seed=0)
    x, d = data((64, 30, 10), batch=16, dtype=torch.float32)
    rule = EquilibriumProp(0.5, "positive", Relaxation(free_steps=20, nudge_steps=4))
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, x, d, monkeypatch=monkeypatch)
    assert len(counted) == 1
    assert_close(fast_grads, slow_grads, tol=2e-6)
    assert torch.equal(fast.prediction, slow.prediction)


def test_ties_at_the_bound_are_broken_by_the_field(counted, monkeypatch):
    """A strongly driven output saturates: several units at exactly 1 (and rows all at 0), where the prediction is
    the tied unit with the largest field, as Cost.predict decides."""
    net = Network.layered((12, 9, 4), "hard_sigmoid", dtype=torch.float64, seed=5)
    with torch.no_grad():  # units 0 and 1 saturate at 1 for every example; unit 1's field is the larger
        net.bias(2).copy_(torch.tensor([5.0, 5.5, -5.0, -5.0]))
    x, d = data((12, 9, 4), batch=12)
    rule = EquilibriumProp(0.5, "positive", Relaxation(free_steps=30, nudge_steps=2))
    (fast, _), (slow, _) = both(rule, net, x, d, monkeypatch=monkeypatch)
    output = fast.free_state[-1]
    assert bool((output[:, :2] == 1.0).all())  # ties at the bound
    assert torch.equal(fast.prediction, slow.prediction)
    assert not torch.equal(fast.prediction, output.argmax(-1))  # and the field, not the first index, decides


@pytest.mark.parametrize("case", ["subclass", "concave nudge", "native off", "cost", "broadcast target",
                                  "STDP subclass"])
def test_what_it_leaves_to_the_general_path(case, counted):
    net = Network.layered(SMALL, "hard_sigmoid", dtype=torch.float64, seed=0)
    x, d = data(SMALL)
    relaxation = dict(native=False) if case == "native off" else dict()
    beta = -2.0 if case == "concave nudge" else 0.5  # the nudged phase's 1 + beta' = -1 < 0
    kind = type("MyEP", (EquilibriumProp,), {}) if case == "subclass" else EquilibriumProp
    rule = kind(beta, "positive", Relaxation(method="async" if case == "concave nudge" else "euler", **relaxation))
    if case == "cost":
        from earlyprop.cost import CrossEntropyReadout

        rule = EquilibriumProp(0.5, "positive", cost=CrossEntropyReadout(SMALL[-1], SMALL[-1]).double())
        d = d.argmax(-1)
    if case == "broadcast target":
        d = d[:1]
    if case == "STDP subclass":
        rule = type("MySTDP", (STDP,), {})(0.5)
    try:
        rule.compute_grads(net, x, d)
    except ValueError:
        pass  # the general path's own verdict on a target it cannot use
    assert counted == []


@pytest.mark.parametrize("change", ["relaxation", "weight replaced", "bias replaced", "beta", "variant"])
def test_the_prepared_step_follows_the_rule_and_the_network(change, counted, monkeypatch):
    """What the compiled step prepares once (earlyprop.step_plan's plans) is remade when the rule or the network
    changes between steps: the next step agrees with the general path, or is left to it where a new beta or
    variant makes a nudge of the block solver concave."""
    net = Network.layered(SMALL, "hard_sigmoid", dtype=torch.float64, bias_std=0.2, gain=1.5, seed=1)
    x, d = data(SMALL)
    rule = EquilibriumProp(0.5, "positive", Relaxation(method="async", free_steps=15, nudge_steps=6))
    rule.compute_grads(net, x, d)
    if change == "relaxation":
        rule.relaxation = replace(rule.relaxation, method="euler", free_steps=5, nudge_steps=3)
    elif change == "weight replaced":
        net.interactions[1].weight = torch.nn.Parameter(net.interactions[1].weight.detach() * 0.5)
    elif change == "bias replaced":
        net.biases[1] = torch.nn.Parameter(net.bias(2).detach() + 0.3)
    elif change == "beta":
        rule.beta = -2.0  # 1 + beta' = -1
    else:
        rule.beta, rule.variant = 1.5, "centered"  # nu_1 = -1.5: 1 + beta' = -0.5
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, x, d, monkeypatch=monkeypatch)
    assert len(counted) == (1 if change in ("beta", "variant") else 2)
    assert_close(fast_grads, slow_grads)
    assert_close(fast.free_state, slow.free_state)
    assert fast.free_steps == slow.free_steps == (5 if change == "relaxation" else 15)


SOFTPLUS = Nonlinearity.from_callables(torch.nn.functional.softplus, torch.sigmoid, name="softplus")


@pytest.mark.parametrize("input_rho", ["hard_sigmoid", "linear", Sigmoid(4.0, 0.5), "tanh", SOFTPLUS])
def test_the_inputs_rate_of_each_kind(input_rho, counted, monkeypatch):
    """The input's rate, by the kernels' rates (native_step.input_rates) for their four kinds and by the rate's own
    torch code for any other, on inputs on both sides of the hard sigmoid's bounds."""
    net = Network.layered(SMALL, "hard_sigmoid", input_rho=input_rho, dtype=torch.float64, bias_std=0.2, gain=1.5,
                          seed=1)
    x, d = data(SMALL)
    rule = EquilibriumProp(0.5, "centered", Relaxation(eps=0.5, free_steps=15, nudge_steps=6))
    (fast, fast_grads), (slow, slow_grads) = both(rule, net, 2.0 * x - 0.5, d, monkeypatch=monkeypatch)
    assert len(counted) == 1
    assert_close(fast_grads, slow_grads)
    assert_close(fast.free_state, slow.free_state)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("input_rho", ["hard_sigmoid", Sigmoid(4.0, 0.5), SOFTPLUS])
def test_a_non_finite_input_gets_the_general_paths_error(value, input_rho, counted):
    """An input the hard sigmoid would clip to a finite rate (inf) is refused all the same, before the kernel runs."""
    net = Network.layered(SMALL, "hard_sigmoid", input_rho=input_rho, dtype=torch.float64, seed=0)
    x, d = data(SMALL)
    x[2, 1] = value
    with pytest.raises(ValueError, match="input of layer 0 contains NaN or inf"):
        EquilibriumProp(0.5, "positive", Relaxation()).compute_grads(net, x, d)
    assert counted == []


def test_a_diverging_step_raises(counted):
    net = Network.layered(SMALL, "hard_sigmoid", dtype=torch.float64, seed=0)
    with torch.no_grad():
        net.interactions[1].weight[0, 0] = float("nan")
    x, d = data(SMALL)
    with pytest.raises(DivergenceError, match="free phase"):
        EquilibriumProp(0.5, "positive", Relaxation()).compute_grads(net, x, d)
    assert len(counted) == 1


def test_a_fallback_draws_the_random_signs_once(counted):
    """Random-sign EP with the block solver and beta' = 1.5: a phase with sign -1 is concave, which the compiled step
    leaves to the general path; it decides so before drawing the signs, so the general path draws the same ones as
    with the kernels switched off."""
    net = Network.layered(SMALL, "hard_sigmoid", dtype=torch.float64, seed=0)
    x, d = data(SMALL)
    grads = []
    for flag in (True, False):
        net.zero_grad(set_to_none=True)
        rule = EquilibriumProp(1.5, "random_sign", Relaxation(method="async", native=flag))
        rule.compute_grads(net, x, d, generator=torch.Generator().manual_seed(7))
        grads.append([p.grad.clone() for p in net.parameters()])
    assert counted == []
    assert_close(*grads)
