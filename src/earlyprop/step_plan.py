"""The Python side of a contrastive rule's training step in one compiled call (:func:`earlyprop.native_step.ep_step`).

:func:`compiled_step` is ``rule.compute_grads`` through the kernel, or None where the kernel does not apply (then the
general path of ``relax`` runs; :mod:`earlyprop.native_step` says when it applies). A step is: check the input, the
input's rate, the input drive (one MKL product), one kernel call, W_1's gradient (a second MKL product), and the
gradients handed over as ``.grad``. Everything that depends only on the rule's relaxation, the estimate's form and
the network's layout is prepared once (:class:`StepPlan`, kept with the :class:`~earlyprop.chain_layout.ChainLayout`
in ``network.memo``): in place, right after the kernels and the products have filled the caches, every torch or
Python operation costs 3-4 times its isolated time, and the Python of a step was ~400 us of config A's ~1.4 ms
(BENCHMARKS.md, 2026-11-28 15:30).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from earlyprop import native, native_step, small_gemm
from earlyprop.chain_layout import ChainLayout, autocast_enabled, dense_chain
from earlyprop.cost import SquaredError
from earlyprop.dynamics import DivergenceError
from earlyprop.native_chain import KINDS, rate_params
from earlyprop.native_step import ASYNC, EP, EULER, FORMS
from earlyprop.rules.base import Relaxation, StepResult, accumulate_grads  # (rules.contrastive imports this module)

MAX_KEPT = 8  # plans per layout (relaxations x forms x betas), fixed nudges per plan: the oldest goes first


class StepPlan:
    """What :func:`compiled_step` prepares once per relaxation, estimate form, beta and chain layout: the kernel's
    fixed arguments, where its outputs lie in one flat buffer per step, and the phase arrays of fixed nudges.

    ``relax`` is a frozen dataclass, so the plan stays true for as long as the rule keeps the same object; the
    layout's own key covers the network (weights' identity and storage, rates, batch size, threads)."""

    def __init__(self, relax: Relaxation, layout: ChainLayout, form: int):
        kernels, sizes, batch, n = layout.kernels, layout.sizes, layout.batch, layout.n
        self.relax, self.layout, self.n = relax, layout, n  # (holding relax keeps its id, the plan's key, unique)
        self.np_dtype = dtype = kernels.params.dtype
        solver = EULER if relax.method == "euler" else ASYNC
        self.fixed = (kernels.layout, kernels.params, kernels.weights, form, solver, dtype.type(relax.eps),
                      dtype.type(relax.omega), nudge_factor(relax), relax.free_steps, relax.nudge_steps, relax.project,
                      -1.0 if relax.tol is None else float(relax.tol), relax.check_every)
        # one buffer per step for the state and what the kernel writes besides it, and the biases as (batch, n_k)
        # fields: the state, d_1, the biases' gradients, W_2..W_n's, the cost, the static fields of layers 2..n
        self.shapes = [(layout.length,), (batch * sizes[1],), *((sizes[k],) for k in range(1, n + 1)),
                       *((sizes[k], sizes[k - 1]) for k in range(2, n + 1)), (batch,),
                       *((batch, sizes[k]) for k in range(2, n + 1))]
        self.bounds = np.cumsum([0, *(math.prod(shape) for shape in self.shapes)]).tolist()
        self._fixed_nudges: dict = {}
        # x's drive b_1 + rho(x) W_1^T by a product that reads W_1 in place, where one runs (earlyprop.small_gemm)
        w = layout.w[1]
        self.drive = small_gemm.transposed_kernels(batch, sizes[0], sizes[1], w.dtype) if w.is_contiguous() else None
        rho = layout.rhos[0]  # the input's rate by a kernel where it has one (and its check in the same pass)
        self.input_rate = (KINDS[type(rho)], *map(dtype.type, rate_params(rho))) \
            if type(rho) in KINDS else None

    def buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, list[np.ndarray]]:
        """A fresh flat tensor, the state first (:meth:`ChainLayout.views` of the tensor are the state's layers), and
        its parts (numpy views, shaped as :attr:`shapes`)."""
        flat = torch.empty(self.bounds[-1], dtype=dtype)
        array, b = flat.numpy(), self.bounds
        return flat, [array[b[i]:b[i + 1]].reshape(shape) for i, shape in enumerate(self.shapes)]

    def phase_arrays(self, nus: tuple, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`phase_arrays` of (nu_1, nu_2), made once per pair of floats (the kernel only reads them)."""
        if any(isinstance(nu, Tensor) for nu in nus):
            return phase_arrays(nus, batch, self.np_dtype)
        arrays = self._fixed_nudges.get(nus)
        if arrays is None:
            _bounded(self._fixed_nudges)
            arrays = self._fixed_nudges[nus] = phase_arrays(nus, batch, self.np_dtype)
        return arrays


def compiled_step(rule, network, x: Tensor, target: Tensor, state=None, generator=None, form: str = "ep"):
    """``rule.compute_grads(network, x, target, state, generator)`` through :func:`earlyprop.native_step.ep_step`, or
    None where it does not apply (decided before anything is drawn from ``generator`` or validated twice); the caller
    then runs the general path. ``form``: ``"ep"`` for ``EquilibriumProp``, the form of an ``STDP`` rule."""
    batch = (x if state is None else state[0]).shape[0]
    found = _plan(rule, network, batch, target, FORMS[form])
    if found is None:
        return None
    plan, weights = found
    n, dtype = plan.n, weights[0].dtype
    if state is None:  # the rest state s = 0 (init_state) without its zero tensors: the buffer's is zeroed below
        start = [*network.clamped_inputs(x, values=plan.input_rate is None), *[None] * n]
    else:
        network.check_state(state)
        start = state
    if any(t is not None and t.dtype != dtype for t in start):
        return None
    nus = rule.nudges(batch, generator, dtype, network.device)
    betas, nudged, coef = plan.phase_arrays(nus, batch)
    biases = [network.bias(k) for k in range(1, n + 1)]
    with torch.no_grad():
        input_rate = _input_rate(plan, network, start[0])  # rho(x), read by both products
        drive = _drive(plan, biases[0], input_rate, weights[0])  # b_1 + rho(x) W_1^T: the first product
        flat, parts = plan.buffers(dtype)
        free, views = parts[0], plan.layout.views(flat)
        if state is None:
            free[:] = 0.0
        else:
            for k in range(1, n + 1):
                views[k].copy_(state[k])
        input_scaled, bias_grads, weight_grads = parts[1], parts[2:n + 2], parts[n + 2:2 * n + 1]
        cost, statics = parts[2 * n + 1], [drive.numpy()]
        for bias, field in zip(biases[1:], parts[2 * n + 2:]):
            field[:] = bias.detach().numpy()
            statics.append(field)
        prediction = torch.empty(batch, dtype=torch.int64)
        status, steps = native_step.ep_step(free, tuple(statics), target.detach().contiguous().numpy()
                                            .reshape(-1), betas, nudged, *plan.fixed, coef, input_scaled,
                                            tuple(bias_grads), tuple(weight_grads), prediction.numpy(), cost)
        if status:
            _diverged(status, steps, plan.relax, nus)
        x = start[0].detach() if start[0].requires_grad else start[0]  # the input itself, as relax returns it
        first = torch.mm(torch.from_numpy(input_scaled).view(batch, -1).T, input_rate)  # the second product
    # views of one buffer as .grad: the weights' and biases' gradients, all of them (checked in _plan)
    accumulate_grads([*weights, *biases], [first, *map(torch.from_numpy, weight_grads),
                                           *map(torch.from_numpy, bias_grads)], owned=True)
    return StepResult([x, *views[1:]], torch.from_numpy(cost), prediction, steps)


def _drive(plan: StepPlan, bias: Tensor, rate: Tensor, w: Tensor) -> Tensor:
    """b_1 + rho(x) W_1^T: by the plan's product where it has one (rate is contiguous: made by _input_rate or
    rho), else by torch."""
    if plan.drive is None or not rate.is_contiguous():
        return torch.addmm(bias, rate, w.T)
    out = torch.empty(rate.shape[0], w.shape[0], dtype=w.dtype)  # (not expand().contiguous(): at batch 1 that is
    out.copy_(bias.detach())  # the bias itself, which the product would then add into)
    plan.drive[1](rate.data_ptr(), w.data_ptr(), out.data_ptr())
    return out


def _input_rate(plan: StepPlan, network, x: Tensor) -> Tensor:
    """rho(x), by :func:`earlyprop.native_step.input_rates` where the plan has the input's kind (a non-finite x then
    gets ``clamped_inputs``' ValueError), else by the network's rate."""
    if plan.input_rate is None:
        return network.rhos[0].rho(x)
    source = x.detach().contiguous()
    rate = torch.empty_like(source)
    if not native_step.input_rates(source.view(-1).numpy(), rate.view(-1).numpy(), *plan.input_rate):
        network.clamped_inputs(x)
    return rate


def _plan(rule, network, batch: int, target: Tensor, form: int) -> tuple[StepPlan, list[Tensor]] | None:
    """(the plan, W_1..W_n) when the compiled step applies to this rule, network and target, else None. Cheap checks
    only: no device read, nothing drawn."""
    relax = rule.relaxation
    if (native.numba is None or type(relax) is not Relaxation or not relax.native
            or type(rule.cost) is not SquaredError or autocast_enabled(target.device.type)):
        return None
    weights = dense_chain(network)
    if (weights is None or weights[0].device.type != "cpu" or target.dtype != weights[0].dtype
            or tuple(target.shape) != (batch, network.sizes[-1])):
        return None
    layout = ChainLayout.of(network, weights, batch, True)
    if layout.kernels is None:
        return None
    key = (id(relax), form, rule.beta, rule.variant)
    kept = layout.step_plans.get(key)
    if kept is None:
        _bounded(layout.step_plans)
        plan = StepPlan(relax, layout, form) if _applies(rule, network, weights, form) else None
        kept = layout.step_plans[key] = plan or _NoPlan(relax)
    return (kept, weights) if isinstance(kept, StepPlan) else None


class _NoPlan:
    """A relaxation the compiled step does not apply to, remembered like a plan (holding the relaxation, so that the
    key's id of it stays its own while the verdict is kept)."""

    def __init__(self, relax: Relaxation):
        self.relax = relax


def _applies(rule, network, weights: list[Tensor], form: int) -> bool:
    """The checks that depend on the relaxation, the estimate and the network's parameters alone."""
    relax = rule.relaxation
    if (not (relax.tol is None or isinstance(relax.tol, int | float) and 0 <= relax.tol < math.inf)
            or not isinstance(relax.check_every, int) or relax.check_every < 1
            or relax.method not in ("euler", "async") or relax.nudge_scale not in ("eps", "none")
            or not _plain_count(relax.free_steps) or not _plain_count(relax.nudge_steps)
            or not isinstance(relax.eps, int | float) or not 0 < relax.eps < math.inf):
        return False
    if relax.method == "async" and form == EP:  # a concave nudge (1 + beta' <= 0): the general path's minimiser
        # (the STDP rule's nudged phases are Euler steps whatever solved the free phase)
        b = rule.beta
        betas = {"positive": (b,), "negative": (-b,)}.get(rule.variant, (b, -b))
        if any(1.0 + nudge_factor(relax) * beta <= 0 for beta in betas):
            return False
    # the step hands over gradients for the weights and biases only: they must be all of the parameters
    covered = {id(w) for w in weights} | {id(network.bias(k)) for k in range(1, len(weights) + 1)}
    return covered == {id(p) for p in network.parameters()}


def phase_arrays(nus, batch: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's view of (nu_1, nu_2), floats or per-example tensors: the betas per example, (2, batch); which
    phases are nudged (a zero phase is the free state itself); and the estimate's -w / B per example,
    w = 1 / (nu_2 - nu_1)."""
    betas = np.empty((2, batch), dtype=dtype)
    for p, nu in enumerate(nus):
        betas[p] = nu.detach().numpy() if isinstance(nu, Tensor) else nu
    nudged = np.array([isinstance(nu, Tensor) or nu != 0.0 for nu in nus])
    spread = nus[1] - nus[0]
    coef = np.empty(batch, dtype=dtype)
    coef[:] = (-1.0 / spread / batch).detach().numpy() if isinstance(spread, Tensor) else -1.0 / spread / batch
    return betas, nudged, coef


def nudge_factor(relax: Relaxation) -> float:
    """beta' / beta (BF-9, THEORY A1): the Euler nudge's k = c beta / eps and the block minimiser's a = 1 + beta'."""
    return 1.0 if relax.nudge_scale == "eps" else 1.0 / relax.eps


def _bounded(kept: dict) -> None:
    while len(kept) >= MAX_KEPT:
        del kept[next(iter(kept))]


def _plain_count(steps) -> bool:
    return isinstance(steps, int) and steps >= 0


def _diverged(status: int, steps: int, relax: Relaxation, nus) -> None:
    phase = "free" if status == 1 else "nudged"
    beta = nus[status - 2] if status > 1 else 0.0
    beta_text = "per-example" if isinstance(beta, Tensor) else f"{beta:g}"
    raise DivergenceError(
        f"relaxation diverged: non-finite state by step {steps} of the {phase} phase (eps={relax.eps:g}, "
        f"beta={beta_text}); reduce eps (stable when eps < 2/lambda_max(H)) or beta")
