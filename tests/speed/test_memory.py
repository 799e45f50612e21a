"""Memory per batch is O(batch x units) whatever the number of steps; trajectories only on request (issue 4).

The peak is measured as the largest total size of the tensors that the ops of a call create and that are alive
at once (a ``TorchDispatchMode`` sees every op's output; a storage is counted until its last tensor dies),
so it does not depend on the allocator or on the process's other memory.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from earlyprop.chain import LONG_PHASE
from earlyprop.dynamics import relax
from earlyprop.network import Network
from earlyprop.rules import EquilibriumProp, Relaxation


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by the storages that ops made while the mode was active."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.live:
            self.live[ptr] = [t.untyped_storage().nbytes(), 0]
            self.now += self.live[ptr][0]
            self.peak = max(self.peak, self.now)
        self.live[ptr][1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[ptr]


def peak_bytes(fn) -> int:
    with torch.no_grad(), PeakBytes() as mode:
        fn()
    return mode.peak


SIZES = (64, 40, 30, 10)


@pytest.fixture
def net_and_batch():
    net = Network.layered(SIZES, "hard_sigmoid", seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, SIZES[0], generator=gen, dtype=torch.float64)
    d = torch.nn.functional.one_hot(torch.randint(0, 10, (16,), generator=gen), 10).double()
    return net, x, d


@pytest.mark.parametrize("method", ["euler", "async"])
@pytest.mark.parametrize("lean", [True, False])
def test_relaxation_memory_does_not_grow_with_the_steps(net_and_batch, method, lean):
    net, x, d = net_and_batch
    if not lean:  # a zero skip connection keeps the energy (and bipartiteness) but forces the general loop
        from earlyprop.interactions import Dense

        net = Network(SIZES, [*net.interactions, Dense(0, 3, SIZES[0], SIZES[3]).double()], net.rhos).double()
    state_bytes = 16 * sum(SIZES) * 8

    def run(steps, **kw):
        return peak_bytes(lambda: relax(net, net.init_state(x), steps=steps, eps=0.5, project=True, beta=0.5,
                                        target=d, method=method, **kw))

    short, long = run(10), run(300)
    assert long <= short * 1.05 and short <= 12 * state_bytes
    recorded = run(300, record_trajectory=True)
    assert recorded >= 250 * (state_bytes - 16 * SIZES[0] * 8)  # one copy of the free layers per step


@pytest.mark.parametrize("native", [True, False])  # the compiled step (its numba buffers are not seen here) and
def test_training_step_memory_does_not_grow_with_the_steps(net_and_batch, native):  # the torch loops, all seen
    net, x, d = net_and_batch

    def run(steps):
        rule = EquilibriumProp(0.5, "centered", Relaxation(free_steps=steps, nudge_steps=steps, native=native))
        return peak_bytes(lambda: rule.compute_grads(net, x, d))

    run(1)  # the network's memo of the chain's layout (a fixed cost, made on the first call) is then in place
    # a long phase multiplies by copies of the weights made once per phase (chain.LONG_PHASE): compare like with like
    assert run(300) <= run(LONG_PHASE) * 1.05 and run(LONG_PHASE - 1) <= run(10) * 1.05
