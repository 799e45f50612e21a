"""What every learning rule shares: the phase settings and the interface that writes ``.grad``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.cost import Cost, SquaredError
from earlyprop.dynamics import Diagnostics, relax
from earlyprop.network import Network, State


@dataclass(frozen=True)
class Relaxation:
    """Settings of the free and nudged phases (EP17 §5.1.4: eps = 0.5, 20 free + 4 nudged steps).

    ``method`` is the solver of both phases: ``"euler"`` (leaky integrator) or ``"async"`` (exact
    block updates, :mod:`earlyprop.solvers`); then the step counts are iterations.
    """

    eps: float = 0.5
    free_steps: int = 20
    nudge_steps: int = 4
    project: bool = True
    nudge_scale: str = "eps"
    tol: float | None = None
    check_every: int = 10
    method: str = "euler"

    def free(self, network: Network, state: Sequence[Tensor]) -> tuple[State, Diagnostics]:
        return relax(network, state, steps=self.free_steps, eps=self.eps, project=self.project,
                     nudge_scale=self.nudge_scale, tol=self.tol, check_every=self.check_every, method=self.method)

    def nudged(
        self, network: Network, state: Sequence[Tensor], beta: float | Tensor, target: Tensor, cost: Cost,
        record_trajectory: bool = False, method: str | None = None,
    ) -> tuple[State, Diagnostics]:
        """The nudged phase; ``method`` overrides the solver (the STDP rule needs the leaky integrator)."""
        return relax(network, state, steps=self.nudge_steps, eps=self.eps, beta=beta, target=target, cost=cost,
                     project=self.project, nudge_scale=self.nudge_scale, check_every=self.check_every,
                     record_trajectory=record_trajectory, method=method or self.method)


@dataclass
class StepResult:
    """What a rule's step saw: the free state (for persistent particles), C at it, and the prediction."""

    free_state: State
    cost: Tensor
    prediction: Tensor


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

    def predict(self, network: Network, x: Tensor, state: Sequence[Tensor] | None = None) -> tuple[Tensor, State]:
        """Class prediction by free relaxation then argmax of the driven layer (EP17 eq. 40)."""
        with torch.no_grad():
            free, _ = self.relaxation.free(network, state if state is not None else network.init_state(x))
            return self.cost.predict(free[network.driven]), free

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters outside the energy that the rule trains too (e.g. a softmax readout)."""
        return list(self.cost.parameters()) if isinstance(self.cost, torch.nn.Module) else []

    def _free_phase(self, network: Network, x: Tensor, state: Sequence[Tensor] | None) -> State:
        start = state if state is not None else network.init_state(x)
        free, _ = self.relaxation.free(network, start)
        return free

    def _readout_grads(self, free: State, target: Tensor, network: Network) -> Tensor:
        """C at the free state; a readout outside the dynamics gets its direct gradient dC/dW_out (LA21)."""
        params = self.extra_parameters()
        with torch.enable_grad():
            value = self.cost.value(free[network.driven].detach(), target)
            if params:
                accumulate_grads(params, torch.autograd.grad(value.mean(), params))
        return value.detach()


def accumulate_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    """p.grad += g, creating it when absent (the semantics of ``Tensor.backward``)."""
    for p, g in zip(params, grads):
        g = g.detach().to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
