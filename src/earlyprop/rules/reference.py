"""Reference gradients: truncated BPTT, recurrent backprop and the feed-forward backprop baseline.

* :class:`BPTT` differentiates the unrolled relaxation loop (ER19, SC23 "TBP").
* :class:`RecurrentBackprop` differentiates the fixed point implicitly (SB19; THEORY §3.2):
  solve H lambda = dC/ds (the fixed point of RBP's adjoint relaxation; by conjugate gradients, since
  H is symmetric positive definite at a stable fixed point, BF-8), then
  dJ/dtheta = dC/dtheta - d^2E/(dtheta ds) lambda. This is "the true gradient" (THEORY ref B).
* :class:`Backprop` trains a plain feed-forward MLP with the network's own layered weights,
  u_{l+1} = W_l rho(u_l) + b_{l+1} (THEORY ref C): the baseline users compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from earlyprop.cost import Cost
from earlyprop.dynamics import relax
from earlyprop.network import Network, State
from earlyprop.rules.base import LearningRule, Relaxation, StepResult, accumulate_grads


class BPTT(LearningRule):
    """Backprop through the last ``truncation`` steps of the free phase (all of them when None)."""

    name = "bptt"

    def __init__(self, truncation: int | None = None, relaxation: Relaxation | None = None, cost: Cost | None = None):
        super().__init__(relaxation, cost)
        self.truncation = truncation

    def compute_grads(self, network: Network, x: Tensor, target: Tensor, state: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> StepResult:
        r = self.relaxation
        k = r.free_steps if self.truncation is None else min(self.truncation, r.free_steps)
        start = state if state is not None else network.init_state(x)
        early, _ = relax(network, start, steps=r.free_steps - k, eps=r.eps, project=r.project)
        with torch.enable_grad():
            final, _ = relax(network, early, steps=k, eps=r.eps, project=r.project, differentiable=True)
            value = self.cost.value(final[network.driven], target)
            params = list(network.parameters()) + self.extra_parameters()
            grads = torch.autograd.grad(value.mean(), params, allow_unused=True)
        accumulate_grads(params, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
        final = [s.detach() for s in final]
        return StepResult(final, value.detach(), self.predict_state(network, final), r.free_steps)


class RecurrentBackprop(LearningRule):
    """Implicit differentiation at the free fixed point (recurrent backprop, SB19)."""

    name = "rbp"

    def __init__(self, max_iter: int = 200, tol: float = 1e-10, relaxation: Relaxation | None = None,
                 cost: Cost | None = None):
        super().__init__(relaxation, cost)
        self.max_iter, self.tol = max_iter, tol

    def compute_grads(self, network: Network, x: Tensor, target: Tensor, state: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> StepResult:
        free, diagnostics = self._free_phase(network, x, state)
        grads = self.gradient(network, free, target)
        accumulate_grads(list(network.parameters()), grads)
        value = self._readout_grads(free, target, network)
        return StepResult(free, value, self.predict_state(network, free), diagnostics.steps)

    def gradient(self, network: Network, free: State, target: Tensor) -> list[Tensor]:
        """dJ/dtheta of J = mean_batch C(s*(theta)), aligned with network.parameters()."""
        r = self.relaxation
        active = _active_units(network, free, r.project)
        g = [torch.zeros_like(s) for s in free]
        g[network.driven] = self.cost.grad(free[network.driven], target) / free[0].shape[0]
        lam = _conjugate_gradient(lambda v: [h * a for h, a in zip(_hessian_vector(network, free, v), active)],
                                  [gi * a for gi, a in zip(g, active)], self.max_iter, self.tol)
        params = list(network.parameters())
        with torch.enable_grad():
            force = network.grad_energy(free)
            total = sum((force[m] * lam[m]).sum() for m in network.free)
            mixed = torch.autograd.grad(total, params, allow_unused=True)
        return [-m if m is not None else torch.zeros_like(p) for m, p in zip(mixed, params)]


def _conjugate_gradient(matvec, rhs: list[Tensor], max_iter: int, tol: float) -> list[Tensor]:
    """Solve A x = rhs for a symmetric positive definite operator on lists of tensors."""
    def dot(a, b):
        return sum((ai * bi).sum() for ai, bi in zip(a, b))

    x = [torch.zeros_like(r) for r in rhs]
    res = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    rr = dot(res, res)
    stop = tol**2 * max(float(rr), 1e-300)
    for _ in range(max_iter):
        if float(rr) <= stop:
            break
        a_dir = matvec(direction)
        alpha = rr / dot(direction, a_dir)
        x = [xi + alpha * di for xi, di in zip(x, direction)]
        res = [ri - alpha * ai for ri, ai in zip(res, a_dir)]
        rr_new = dot(res, res)
        direction = [ri + (rr_new / rr) * di for ri, di in zip(res, direction)]
        rr = rr_new
    return x


def _active_units(network: Network, state: State, project: bool) -> list[Tensor]:
    """1 where a unit can respond to a perturbation; 0 on clamped layers and on units held at a bound."""
    out = []
    for i, s in enumerate(state):
        bounds = network.rhos[i].bounds if project else None
        if i not in network.free:
            out.append(torch.zeros_like(s))
        elif bounds is None:
            out.append(torch.ones_like(s))
        else:
            out.append(((s > bounds[0]) & (s < bounds[1])).to(s.dtype))
    return out


def _hessian_vector(network: Network, state: State, vector: list[Tensor]) -> list[Tensor]:
    """H v with H the Hessian of E in the free state (BF-8), by double backprop."""
    with torch.enable_grad():
        s = [t.detach().requires_grad_(i in network.free) for i, t in enumerate(state)]
        force = network.grad_energy(s)
        total = sum((force[m] * vector[m]).sum() for m in network.free)
        hv = torch.autograd.grad(total, [s[m] for m in network.free])
    out = [torch.zeros_like(t) for t in state]
    for m, h in zip(network.free, hv):
        out[m] = h.detach()
    return out


class Backprop(LearningRule):
    """A feed-forward MLP with the network's layered weights, trained by ordinary backprop."""

    name = "backprop"

    def forward(self, network: Network, x: Tensor) -> Tensor:
        """The output potential of u_{l+1} = W_l rho(u_l) + b_{l+1}, u_0 = x.

        The output is linear (no rho): with a bounded rho, a saturated output unit would get no
        gradient and never recover, which would make the baseline needlessly weak.
        """
        u = x.to(network.dtype)
        for term in network.layered_pairs():
            u = term.feedforward(network.rhos[term.pre].rho(u)) + network.bias(term.post)
        return u

    def compute_grads(self, network: Network, x: Tensor, target: Tensor, state: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> StepResult:
        with torch.enable_grad():
            y = self.forward(network, x)
            value = self.cost.value(y, target)
            params = list(network.parameters()) + self.extra_parameters()
            grads = torch.autograd.grad(value.mean(), params, allow_unused=True)
        accumulate_grads(params, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
        return StepResult(network.init_state(x), value.detach(), self.cost.predict(y).detach())

    def answer(self, network: Network, x: Tensor, relaxation: Relaxation | None = None) -> tuple[Tensor, Tensor]:
        """The forward pass (nothing to relax) and its argmax (a linear output has no ties to break)."""
        with torch.no_grad():
            y = self.forward(network, x)
        return y, self.cost.predict(y)
