"""What every learning rule shares: the phase settings and the interface that writes ``.grad``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.dynamics import Diagnostics, check_omega, relax
from earlyprop.network import Network, State


@dataclass(frozen=True)
class Relaxation:
    """Settings of the free and nudged phases (EP17 §5.1.4: eps = 0.5, 20 free + 4 nudged steps).

    ``method`` is the solver of both phases: ``"euler"`` (leaky integrator) or ``"async"`` (exact
    block updates, :mod:`earlyprop.solvers`); then the step counts are iterations, and ``omega`` in (0, 2)
    over-relaxes them (projected block SOR: same fixed points, fewer sweeps; 1 = exact block updates).
    """

    eps: float = 0.5
    free_steps: int = 20
    nudge_steps: int = 4
    project: bool = True
    nudge_scale: str = "eps"
    tol: float | None = None
    check_every: int = 10
    method: str = "euler"
    omega: float = 1.0
    native: bool = True  # relax's compiled CPU kernels where they apply (earlyprop.native): same results
    cuda_graphs: bool = True  # on CUDA, stretches of steps as CUDA graphs (earlyprop.cuda_graphs): same results

    def __post_init__(self) -> None:
        check_omega(self.omega, self.method)

    def free(self, network: Network, state: Sequence[Tensor], static: list | None = None,
             internal: bool = False) -> tuple[State, Diagnostics]:
        """The free phase; ``static`` (``network.static_fields``) shares the input drive between phases.

        ``internal``: a phase inside a learning rule's step. The state was made and checked by this library and
        nobody reads the final residual: skip the start state's value scan and the residual (``relax``'s
        ``validate`` and ``final_residual``; a few ops and device reads per phase)."""
        return relax(network, state, steps=self.free_steps, eps=self.eps, project=self.project,
                     nudge_scale=self.nudge_scale, tol=self.tol, check_every=self.check_every, method=self.method,
                     static=static, omega=self.omega, validate=not internal, final_residual=not internal,
                     native=self.native, cuda_graphs=self.cuda_graphs)

    def nudged(
        self, network: Network, state: Sequence[Tensor], beta: float | Tensor, target: Tensor, cost: Cost,
        record_trajectory: bool = False, method: str | None = None, static: list | None = None,
        internal: bool = False,
    ) -> tuple[State, Diagnostics]:
        """The nudged phase; ``method`` overrides the solver (the STDP rule needs the leaky integrator);
        ``internal`` as for :meth:`free`."""
        method = method or self.method
        return relax(network, state, steps=self.nudge_steps, eps=self.eps, beta=beta, target=target, cost=cost,
                     project=self.project, nudge_scale=self.nudge_scale, check_every=self.check_every,
                     record_trajectory=record_trajectory, method=method, static=static,
                     omega=self.omega if method == "async" else 1.0, validate=not internal,
                     final_residual=not internal, native=self.native, cuda_graphs=self.cuda_graphs)


@dataclass
class StepResult:
    """What a rule's step saw: the free state (for persistent particles), C at it, the prediction, and the steps
    the free phase ran (fewer than its budget when ``Relaxation.tol`` stopped it; None without a free phase)."""

    free_state: State
    cost: Tensor
    prediction: Tensor
    free_steps: int | None = None


class LearningRule:
    """A rule has one job: given a network and a batch, write parameter gradients into ``.grad``.

    Gradients accumulate like ``Tensor.backward`` does, so the caller zeroes them (any torch
    optimizer's ``zero_grad``) and then steps any torch optimizer.
    """

    name = "rule"

    def __init__(self, relaxation: Relaxation | None = None, cost: Cost | None = None):
        self.relaxation = relaxation or Relaxation()
        self.cost = cost or SquaredError()

    def compute_grads(
        self, network: Network, x: Tensor, target: Tensor, state: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> StepResult:
        raise NotImplementedError

    def answer(self, network: Network, x: Tensor, relaxation: Relaxation | None = None) -> tuple[Tensor, Tensor]:
        """(driven layer, class prediction) after a free relaxation from rest; ties broken by the field."""
        with torch.no_grad():
            free, _ = (relaxation or self.relaxation).free(network, network.init_state(x), internal=True)
            return free[network.driven], self.predict_state(network, free)

    def predict(self, network: Network, x: Tensor, relaxation: Relaxation | None = None) -> Tensor:
        """Class prediction: argmax of the driven layer, or of the readout (EP17 eq. 40)."""
        return self.answer(network, x, relaxation)[1]

    def predict_state(self, network: Network, state: Sequence[Tensor], static: list | None = None) -> Tensor:
        """Prediction at a relaxed state: argmax of the driven layer, ties among the units at the maximum
        (a bounded rate at its bound) broken by the driven layer's field, the input it was clipped from.
        ``static``: ``network.static_fields`` of the state's clamped inputs, when the caller has it."""
        with torch.no_grad():
            driven = network.driven
            field = network.fields(state, static=static, targets=[driven])[driven]
            return self.cost.predict(state[driven], field).detach()

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters outside the energy that the rule trains too (e.g. a softmax readout)."""
        return list(self.cost.parameters()) if isinstance(self.cost, torch.nn.Module) else []

    def _free_phase(self, network: Network, x: Tensor, state: Sequence[Tensor] | None) -> tuple[State, Diagnostics]:
        start = state if state is not None else network.init_state(x)
        return self.relaxation.free(network, start)

    def _readout_grads(self, free: State, target: Tensor, network: Network) -> Tensor:
        """C at the free state; a readout outside the dynamics gets its direct gradient dC/dW_out (LA21)."""
        params = self.extra_parameters()
        with torch.enable_grad():
            value = self.cost.value(free[network.driven].detach(), target)
            if params:
                accumulate_grads(params, torch.autograd.grad(value.mean(), params))
        return value.detach()


def accumulate_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor], owned: bool = False) -> None:
    """p.grad += g, creating it when absent (the semantics of ``Tensor.backward``).

    ``owned``: the caller hands over fresh tensors that nothing else references, adopted as ``.grad``
    without a copy (a 500x784 float32 copy costs about as much as a whole lean relaxation phase).
    """
    for p, g in zip(params, grads):
        if owned and p.grad is None and g.dtype == p.dtype and not g.requires_grad:
            p.grad = g  # (detach and to() are no-ops here, but each still costs a dispatch)
            continue
        g = g.detach().to(p.dtype)
        if p.grad is None:
            p.grad = g if owned else g.clone()
        else:
            p.grad.add_(g)
