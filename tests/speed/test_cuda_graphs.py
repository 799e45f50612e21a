"""``cuda_graphs``: stretches of the lean chain's steps captured once and replayed (earlyprop.cuda_graphs).

A CUDA graph replays the kernels it captured on the memory it captured them on. On CPU the same bookkeeping runs
with a recording stand-in: "capture" keeps the step's bound calls, "replay" calls those kept calls again, which is
what a graph does (the same functions on the same tensors). So these tests check, without a GPU, what graph mode
adds to the torch loops: the phase's values copied into the layout's kept buffers, the graphs found again from batch
to batch by their calls' signature, the returned states copied out, and results equal to the plain torch loops.
The last test runs the real thing where CUDA is available (scripts/gpu_bench.sh runs the suite's GPU tests).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import earlyprop.cuda_graphs as cuda_graphs
from earlyprop.cuda_graphs import PhaseBuffers, StepGraphs, signature
from earlyprop.dynamics import relax
from earlyprop.network import Network
from earlyprop.nonlinearity import Sigmoid
from earlyprop.rules import EquilibriumProp, Relaxation


class RecordedGraphs(StepGraphs):
    """StepGraphs with a recording stand-in for CUDA's capture: a graph is the list of calls it was captured from."""

    def _on_stream(self, work):
        work()

    def _capture(self, calls, count):
        kept = list(calls)
        return partial(cuda_graphs._repeat, kept, count)


@pytest.fixture
def recorded(monkeypatch):
    made: list[RecordedGraphs] = []

    def graphs_for(device):
        made.append(RecordedGraphs(device))
        return made[-1]

    monkeypatch.setattr(cuda_graphs, "step_graphs_for", graphs_for)
    return made


CASES = {  # name: (sizes, rate, EP variant, relaxation settings)
    "euler hard sigmoid": ((30, 24, 5), "hard_sigmoid", "positive", dict(eps=0.5, free_steps=20, nudge_steps=4)),
    "euler 3 hidden": ((30, 16, 12, 8, 5), "hard_sigmoid", "positive", dict(eps=0.5, free_steps=25, nudge_steps=6)),
    "async centered": ((30, 24, 5), "hard_sigmoid", "centered", dict(method="async", free_steps=15, nudge_steps=7)),
    "async omega": ((30, 24, 12, 5), "hard_sigmoid", "centered",
                    dict(method="async", omega=1.5, free_steps=12, nudge_steps=5)),
    "leaky logistic": ((30, 24, 5), Sigmoid(gain=4.0, shift=0.5), "positive",
                       dict(eps=0.2, free_steps=40, nudge_steps=12, project=False, nudge_scale="none")),
    "tanh": ((30, 24, 5), "tanh", "positive", dict(eps=0.3, free_steps=20, nudge_steps=6)),
    "tolerance": ((30, 24, 12, 5), "hard_sigmoid", "positive", dict(eps=0.5, free_steps=60, nudge_steps=8, tol=1e-6,
                                                                    check_every=7)),
}


def batches(count: int = 5, batch: int = 6):
    gen = torch.Generator().manual_seed(3)
    return [(torch.rand(batch, 30, generator=gen, dtype=torch.float64),
             torch.nn.functional.one_hot(torch.randint(0, 5, (batch,), generator=gen), 5).double())
            for _ in range(count)]


def train(sizes, rho, variant, settings, graphs: bool) -> tuple[list[torch.Tensor], list]:
    """Five SGD batches of EP in the torch loops (float64); the weights after them and the free states."""
    net = Network.layered(sizes, rho, seed=1, dtype=torch.float64)
    rule = EquilibriumProp(0.5, variant, Relaxation(native=False, cuda_graphs=graphs, **settings))
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    states = []
    for x, y in batches():
        opt.zero_grad(set_to_none=True)
        states.append(rule.compute_grads(net, x, y).free_state)
        opt.step()
    return [p.detach().clone() for p in net.parameters()], states


@pytest.mark.parametrize("case", list(CASES))
def test_graph_mode_trains_as_the_torch_loops(recorded, case):
    sizes, rho, variant, settings = CASES[case]
    plain_weights, plain_states = train(sizes, rho, variant, settings, graphs=False)
    assert not recorded
    weights, states = train(sizes, rho, variant, settings, graphs=True)
    for a, b in zip(weights, plain_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for got, want in zip(states, plain_states):  # each batch's free state intact after the later phases
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # one layout per batch shape (centered EP runs its two nudged phases as one batch of both)
    replays, captures = sum(g.replays for g in recorded), sum(g.captures for g in recorded)
    assert replays >= 5 * 2, "the stretches of every batch ran as graphs"
    assert captures <= 4 * len(recorded), f"graphs captured again from batch to batch: {captures}"


def test_a_returned_state_is_not_the_next_phases_buffer(recorded):
    net = Network.layered((30, 24, 5), "hard_sigmoid", seed=1, dtype=torch.float64)
    (x, y), (x2, _) = batches(2)
    first, _ = relax(net, net.init_state(x), steps=20, eps=0.5, project=True, native=False, cuda_graphs=True)
    kept = [t.clone() for t in first[1:]]
    relax(net, net.init_state(x2), steps=20, eps=0.5, project=True, native=False, cuda_graphs=True)
    for a, b in zip(first[1:], kept):
        assert torch.equal(a, b)
    assert recorded[0].replays >= 2


def test_off_cuda_the_option_changes_nothing():
    net = Network.layered((30, 24, 5), "hard_sigmoid", seed=1, dtype=torch.float64)
    x, y = batches(1)[0]
    with_option, _ = relax(net, net.init_state(x), steps=20, eps=0.5, beta=0.5, target=y, project=True,
                           native=False, cuda_graphs=True)
    without, _ = relax(net, net.init_state(x), steps=20, eps=0.5, beta=0.5, target=y, project=True, native=False)
    for a, b in zip(with_option, without):
        assert torch.equal(a, b)
    layouts = [v for v in net.memo.values() if hasattr(v, "step_graphs")]
    assert layouts and all(layout.step_graphs() is None for layout in layouts)


def test_a_prediction_under_inference_mode_then_training(recorded):
    """Buffers made under torch.inference_mode cannot be written outside it: the next phase gets new ones."""
    net = Network.layered((30, 24, 5), "hard_sigmoid", seed=1, dtype=torch.float64)
    rule = EquilibriumProp(0.5, "positive", Relaxation(native=False, cuda_graphs=True))
    x, y = batches(1)[0]
    with torch.inference_mode():
        first = rule.predict(net, x)
    rule.compute_grads(net, x, y)
    assert torch.equal(rule.predict(net, x), first)
    assert all(p.grad is not None for p in net.parameters())


def test_the_signature_holds_every_bound_tensor_and_value():
    a, b = torch.zeros(4), torch.zeros(4)
    base = signature([partial(torch.add, a, b, alpha=2.0, out=a), partial(a.clamp_, 0.0, 1.0)])
    assert base is not None
    assert signature([partial(torch.add, a, b, alpha=2.0, out=a), partial(a.clamp_, 0.0, 1.0)]) == base
    assert signature([partial(torch.add, a, a, alpha=2.0, out=a), partial(a.clamp_, 0.0, 1.0)]) != base
    assert signature([partial(torch.add, a, b, alpha=3.0, out=a), partial(a.clamp_, 0.0, 1.0)]) != base
    assert signature([partial(torch.add, a, b, alpha=2.0, out=a), partial(b.clamp_, 0.0, 1.0)]) != base
    assert signature([partial(torch.add, a[1:], b[1:], alpha=2.0, out=a[1:]), partial(a.clamp_, 0.0, 1.0)]) != base
    # a Python function may branch on values or read the device: never captured
    assert signature([partial(lambda t: t.add_(1), a)]) is None
    assert signature([lambda: a.add_(1)]) is None
    assert signature([partial(a.add_, object())]) is None


def test_kept_buffers_are_reused_by_name_and_geometry():
    buffers = PhaseBuffers()
    first = buffers.keep("pull", torch.ones(3, 2))
    again = buffers.keep("pull", torch.full((3, 2), 2.0))
    assert again.data_ptr() == first.data_ptr() and torch.equal(first, torch.full((3, 2), 2.0))
    assert buffers.keep("pull", torch.ones(4, 2)).data_ptr() != first.data_ptr()  # a new geometry, a new buffer
    expanded = buffers.keep("bias", torch.arange(3.0).expand(2, 3))
    assert expanded.is_contiguous() and torch.equal(expanded, torch.arange(3.0).expand(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU tests above use a stand-in)")
@pytest.mark.parametrize("case", ["euler hard sigmoid", "async centered", "leaky logistic", "tolerance"])
def test_cuda_graphs_on_a_gpu_train_as_without(case):
    sizes, rho, variant, settings = CASES[case]
    results = []
    for graphs in (False, True):
        net = Network.layered(sizes, rho, seed=1, dtype=torch.float64).cuda()
        rule = EquilibriumProp(0.5, variant, Relaxation(cuda_graphs=graphs, **settings))
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        for x, y in batches():
            opt.zero_grad(set_to_none=True)
            rule.compute_grads(net, x.cuda(), y.cuda())
            opt.step()
        results.append([p.detach().cpu() for p in net.parameters()])
        layouts = [v for v in net.memo.values() if hasattr(v, "step_graphs")]
        if graphs:
            assert sum(layout.step_graphs().replays for layout in layouts) >= 10
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


NUDGES = {"scalar beta": dict(beta=0.7), "per-example beta": dict(beta=torch.tensor([0.5, -0.5, 0.5, 0.5, -0.5, 0.5],
                                                                                     dtype=torch.float64)),
          "concave rows": dict(beta=torch.tensor([0.5, -2.0, 0.5, 0.5, -2.0, 0.5], dtype=torch.float64)),
          "unscaled": dict(beta=0.5, nudge_scale="none")}


@pytest.mark.parametrize("method", ["euler", "async"])
@pytest.mark.parametrize("nudge", list(NUDGES))
def test_nudged_phases_of_new_batches_replay_as_they_ran(recorded, method, nudge):
    """Three batches' nudged phases (per-example beta: a kept tensor; concave rows of the block solver: Python
    calls, never captured), each against the same phase without graphs."""
    net = Network.layered((30, 24, 12, 5), "hard_sigmoid", seed=1, dtype=torch.float64)
    kw = dict(steps=23, eps=0.5, project=True, native=False, method=method, check_every=10, **NUDGES[nudge])
    for x, y in batches(3):
        start = [t + 0.3 if k else t for k, t in enumerate(net.init_state(x))]
        want, _ = relax(net, start, target=y, cuda_graphs=False, **kw)
        got, _ = relax(net, start, target=y, cuda_graphs=True, **kw)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if nudge == "concave rows" and method == "async":
        assert sum(g.replays for g in recorded) == 0
    else:
        assert sum(g.replays for g in recorded) >= 4


@pytest.mark.parametrize("overrides", [dict(rule="stdp"), dict(rule="ep", persistent=True, solver="async", omega=1.3)])
def test_a_training_run_with_graphs_is_the_run_without(recorded, overrides):
    """One digits epoch through the trainer (the main job's STDP rule; EP with persistent particles and the block
    solver), evaluation included: the same accuracies and final weights."""
    from earlyprop.config import load_config
    from earlyprop.train import train

    summaries = []
    for graphs in (False, True):
        config = load_config(None, {**overrides, "epochs": 1, "hidden": [32], "native": False, "cuda_graphs": graphs,
                                    "dtype": "float64"})
        summaries.append(train(config, log=lambda _: None))
    assert sum(g.replays for g in recorded) > 50
    plain, graphed = summaries
    assert graphed["test_accuracy"] == plain["test_accuracy"] and graphed["train_accuracy"] == plain["train_accuracy"]
    assert graphed["test_cost"] == pytest.approx(plain["test_cost"], rel=1e-12, abs=0)
    assert graphed["test_accuracy"] > 0.5
