"""GPU code paths must not sync the host every relaxation step (issue 4).

A device -> host read (``float(t)``, ``t.item()``, ``bool(t)``, ``torch.equal``, ``t.cpu()``, ...) stalls the host
until the device has run everything queued so far, so on a GPU a read per step serialises the whole loop. On CPU
the same reads are visible to a ``TorchDispatchMode`` (every scalar read goes through
``aten._local_scalar_dense``; ``torch.equal`` is ``aten.equal``) and to wrappers of the Tensor methods that copy
to the host, so this CPU test counts exactly the reads a CUDA run would pay. It counts reads of any tensor,
host scalars included, and tensors made from host data (``torch.tensor``, ``as_tensor``: a blocking copy to
the device): conservative.

What must hold, whatever fixed per-phase cost (input validation, the final residual) a relaxation has: the
count does not grow with the number of steps, only with the number of checks (one every ``check_every`` steps
and one at the last step), and a check costs one read (two with a tolerance: finiteness and the residual).
"""

from __future__ import annotations

import pytest
import torch
from test_fast_paths import DEEP, MIXED, PER_EXAMPLE, data, twin  # tests/speed is on sys.path (rootdir-relative import)
from torch.utils._python_dispatch import TorchDispatchMode

import earlyprop.native as native
from earlyprop.dynamics import relax
from earlyprop.nonlinearity import Sigmoid
from earlyprop.rules import EquilibriumProp, Relaxation

aten = torch.ops.aten
READ_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default,
            aten.lift_fresh.default}  # the last: torch.tensor / as_tensor of host data, a blocking copy to a GPU


class HostReads(TorchDispatchMode):
    """Counts device -> host reads while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READ_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def torch_loops(monkeypatch):
    """The torch loops, which also run on a GPU: the compiled kernels (earlyprop.native) run on CPU only, where
    their arrays are views of the tensors (``.numpy()``, which this counter would count as reads)."""
    monkeypatch.setattr(native, "numba", None)


@pytest.fixture
def host_reads(monkeypatch):
    """``host_reads(fn)``: the number of device -> host reads ``fn()`` makes."""
    counter: list[HostReads] = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if counter:
                counter[-1].count += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("cpu", "tolist", "numpy"):  # a no-op or not dispatched on CPU, a copy and a sync on CUDA
        wrap(name)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):  # .to("cpu") / .to(device=cpu): the same
        device = kwargs.get("device", args[0] if args and isinstance(args[0], str | torch.device) else None)
        if counter and device is not None and torch.device(device).type == "cpu":
            counter[-1].count += 1
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)

    def count(fn) -> int:
        with HostReads() as mode:
            counter.append(mode)
            try:
                fn()
            finally:
                counter.pop()
        return mode.count

    return count


def test_the_counter_sees_every_kind_of_host_read(host_reads):
    t = torch.rand(4)
    reads = [lambda: float(t.sum()), lambda: t.sum().item(), lambda: bool((t > 0).all()), lambda: int(t.argmax()),
             lambda: torch.equal(t, t.clone()), lambda: t.cpu(), lambda: t.tolist(), lambda: t.to("cpu"),
             lambda: t.numpy(), lambda: 1 if (t > 2).any() else 0, lambda: torch.tensor(0.5),
             lambda: torch.as_tensor([1.0, 2.0])]
    assert [host_reads(fn) for fn in reads] == [1] * len(reads)
    assert host_reads(lambda: (t * 2).clamp_(0, 1).lerp_(t, 0.5).sum()) == 0


RHOS = {"hard": ("hard_sigmoid", True), "sigmoid4": (Sigmoid(4.0, 0.5), False)}
NUDGES = {"free": {}, "beta": {"beta": 0.5}, "per_example": {"beta": PER_EXAMPLE}, "concave": {"beta": -2.0},
          "mixed": {"beta": MIXED}, "unscaled": {"beta": 0.3, "nudge_scale": "none"}}
CASES = [  # (rho, solver, lean chain or general loop, nudge)
    *[(rho, "euler", path, nudge) for rho in RHOS for path in ("lean", "general") for nudge in NUDGES],
    *[("hard", "async", path, nudge) for path in ("lean", "general")
      for nudge in ("free", "per_example", "concave", "mixed")],
    *[("hard", "async_sor", path, nudge) for path in ("lean", "general") for nudge in ("free", "mixed")],
]


def phase(rho, method, path, nudge, **extra):
    """relax(steps, check_every, tol) on DEEP for one case: the lean chain, or its general-loop twin."""
    name, project = RHOS[rho]
    if method == "async_sor":  # the over-relaxed block solver
        method, extra = "async", {**extra, "omega": 1.5}
    net = twin(DEEP, name, skip=method == "async")[path == "general"]
    x, d = data(DEEP)
    kw = dict(eps=0.2 if "nudge_scale" in NUDGES[nudge] else 0.5, project=project, method=method,
              **NUDGES[nudge], **extra)
    if "beta" in kw:
        kw["target"] = d
    return lambda steps, check_every, tol=None: relax(net, net.init_state(x), steps=steps, check_every=check_every,
                                                      tol=tol, **kw)


@pytest.mark.parametrize("rho,method,path,nudge", CASES)
def test_relax_reads_the_host_only_at_checks(host_reads, rho, method, path, nudge):
    run = phase(rho, method, path, nudge)
    fixed = host_reads(lambda: run(5, 1000))  # one check, at the last step
    assert host_reads(lambda: run(50, 1000)) == fixed, "a host read that grows with the number of steps"
    # per phase: validation of the state (one read per layer) and of the nudge, one check, the final residual (seen:
    # 8 to 13); the bound leaves room for more validation, but not for reads per unit or per sweep of anything
    assert fixed <= 3 * len(DEEP) + 4
    ten, twenty, fifty = (host_reads(lambda steps=steps: run(steps, 10)) for steps in (10, 20, 50))
    assert twenty - ten <= 1, "more than one host read per check"
    assert fifty == ten + 4 * (twenty - ten)
    assert ten == fixed


@pytest.mark.parametrize("rho,method,path,nudge", [case for case in CASES if case[3] in ("free", "per_example")])
def test_relax_with_a_tolerance_reads_twice_per_check(host_reads, rho, method, path, nudge):
    run = phase(rho, method, path, nudge)
    ten, twenty, fifty = (host_reads(lambda steps=steps: run(steps, 10, tol=1e-30)) for steps in (10, 20, 50))
    assert twenty - ten <= 2 and fifty == ten + 4 * (twenty - ten)


@pytest.mark.parametrize("extra", [dict(temperature=0.01, generator=torch.Generator().manual_seed(0)),
                                   dict(record_trajectory=True), dict(fixed_layers=(4,))])
def test_general_loop_options_read_the_host_only_at_checks(host_reads, extra):
    run = phase("hard", "euler", "lean", "beta", **extra)  # each option moves the lean net to the general loop
    assert host_reads(lambda: run(50, 1000)) == host_reads(lambda: run(5, 1000))


@pytest.mark.parametrize("variant,method", [("positive", "euler"), ("centered", "euler"), ("random_sign", "euler"),
                                            ("centered", "async")])
def test_a_training_batch_reads_the_host_a_fixed_number_of_times(host_reads, variant, method):
    """compute_grads (free + nudged phases + gradients): the count does not depend on the step counts."""
    net = twin(DEEP, "hard_sigmoid")[0]
    x, d = data(DEEP)

    def batch(free, nudged):
        rule = EquilibriumProp(0.5, variant, Relaxation(eps=0.5, free_steps=free, nudge_steps=nudged,
                                                        check_every=1000, method=method))
        for p in net.parameters():
            p.grad = None
        return lambda: rule.compute_grads(net, x, d, generator=torch.Generator().manual_seed(0))

    assert host_reads(batch(60, 12)) == host_reads(batch(5, 2))
