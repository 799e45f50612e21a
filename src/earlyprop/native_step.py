"""A contrastive rule's whole training step on a layered chain in one compiled call (CPU, numba).

``EquilibriumProp.compute_grads`` on a plain layered chain whose phases run in the kernels of
:mod:`earlyprop.native` is, per batch: the input drive (one MKL product), the free phase, the two phases
nu_1 < nu_2 from the free state, the EP estimate (EP17 eq. 24 in ``ep_difference``'s fused form), the prediction
and the cost at the free state, and the input weights' gradient (a second MKL product). Through ``relax`` each of
those is a Python function around torch ops, ~1.2 ms of the ~2.2 ms of config A on the development VM
(BENCHMARKS.md); here everything between the two products is one call of :func:`ep_step`, which runs the same
kernels (:func:`earlyprop.native.euler_steps`, :func:`earlyprop.native.block_sweeps`) on the same buffers.
The STDP rule (BF-17) runs the same way: its nudged phases are Euler steps that add each step's products of the
free-free couplings (plain and Xie-Seung forms), and the sums that telescope (``STDP.accumulate``: the biases',
the input coupling's, all of the tied form's) come from the phases' ends.
Same equations, hence the same phases; the estimate and the cost are summed in another order (round-off only:
tests/speed/test_compiled_step.py compares gradients, free states, predictions and costs with the general path in
float64, tests/speed/test_fast_paths.py twenty-step training curves).

It applies when the general path would run the kernels anyway (``Relaxation.native``, :func:`earlyprop.native.fits`)
and nothing asks for more than the step computes: ``EquilibriumProp`` or ``STDP`` itself with a ``Relaxation`` and
the squared-error cost, a target shaped like the output layer, no autocast, and, for EP's block solver, a convex
nudge (1 + beta' > 0). A ``tol`` stops the free phase as ``relax`` does (checked every ``check_every`` steps, the steps
taken reported). Otherwise :func:`compiled_step` returns None and the general path runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from earlyprop import native
from earlyprop.chain_layout import ChainLayout, autocast_enabled, dense_chain
from earlyprop.cost import SquaredError
from earlyprop.dynamics import DivergenceError
from earlyprop.native import SIZE, START, _copy, _fields, _jit, block_sweeps, euler_steps, fill_all_rates
from earlyprop.rules.base import Relaxation, StepResult, accumulate_grads  # (rules.contrastive imports this module)

EULER, ASYNC = 0, 1
EP, PLAIN, XIE_SEUNG, TIED = 0, 1, 2, 3  # the estimate: EP's, or the STDP rule's form (BF-17)
FORMS = {"ep": EP, "plain": PLAIN, "xie_seung": XIE_SEUNG, "tied": TIED}
# the kernels' flags as numpy scalars: numba compiles a function once more for each literal argument (True, 1) a
# compiled caller passes (seconds each); numpy scalars are typed like the values Python passes
YES, NO, ONE = np.bool_(True), np.bool_(False), np.int64(1)


@_jit(inline="always")
def _finite(s) -> bool:
    for i in range(s.shape[0]):
        if not math.isfinite(s[i]):
            return False
    return True


@_jit(inline="always")
def _nudge(beta, target, factor, batch, m, dtype):
    """(beta'_b per example, beta'_b d flat) for beta' = factor beta."""
    scaled, pull = np.empty(batch, dtype), np.empty(batch * m, dtype)
    for b in range(batch):
        scaled[b] = factor * beta[b]
        for j in range(m):
            pull[b * m + j] = scaled[b] * target[b * m + j]
    return scaled, pull


@_jit(inline="always")
def _nudged_phase(free, r, slope, rows, statics, target, beta, layout, params, weights, solver, rate, factor, steps,
                  project):
    """A nudged phase from the free state, in a new buffer: beta' = factor beta per example (Euler: the nudge
    k (d - s) with k = beta', pull k d; block solver: the minimiser (h + beta' d) / (1 + beta'))."""
    n, batch = layout.shape[1] - 1, statics[0].shape[0]
    s = free.copy()
    scaled, pull = _nudge(beta, target, factor, batch, layout[SIZE, n], free.dtype)
    if solver == EULER:
        euler_steps(s, r, slope, rows, statics, pull, scaled, layout, params, weights, rate, steps, NO, YES, project,
                    YES)
    else:
        for b in range(batch):
            scaled[b] += 1.0
        block_sweeps(s, r, slope, rows, statics, pull, scaled, layout, params, weights, rate, steps, NO, YES)
    return s


@_jit(inline="always")
def _stdp_phase(free, r, slope, rows, statics, target, beta, layout, params, weights, eps, factor, steps, project,
                form, coef, weight_grads):
    """A nudged Euler phase from the free state (a new buffer) that adds every step's products of the free-free
    couplings, coef_b (ds_k, or d rho(s_k) for Xie-Seung) rho(s_{k-1}) with s_{k-1} before the step (BF-17: the
    post-synaptic unit is the one closer to the output), into ``weight_grads[k - 2]``, k = 2..n."""
    n, batch = layout.shape[1] - 1, statics[0].shape[0]
    s = free.copy()
    before, rates_before, rates_after = np.empty_like(free), np.empty_like(free), np.empty_like(free)
    scaled, pull = _nudge(beta, target, factor, batch, layout[SIZE, n], free.dtype)
    fill_all_rates(s, rates_before, slope, layout, params, batch)
    for _ in range(steps):
        _copy(s, before)
        euler_steps(s, r, slope, rows, statics, pull, scaled, layout, params, weights, eps, ONE, NO, YES,
                    project, YES)
        fill_all_rates(s, rates_after, slope, layout, params, batch)
        old, new = (before, s) if form == PLAIN else (rates_before, rates_after)
        for k in range(2, n + 1):
            m, width, g = layout[SIZE, k], layout[SIZE, k - 1], weight_grads[k - 2]
            top, below = layout[START, k], layout[START, k - 1]
            for e in range(batch):
                pre = rates_before[below + e * width:below + (e + 1) * width]
                for j in range(m):
                    a, row = coef[e] * (new[top + e * m + j] - old[top + e * m + j]), g[j]
                    for i in range(width):
                        row[i] += a * pre[i]
        _copy(rates_after, rates_before)
    return s


@_jit(inline="always")
def _differences(a, b, layout, coef, d, input_scaled, bias_grads):
    """d_k = coef (b - a) per free layer (flat, laid out like the state), its batch sum into ``bias_grads[k - 1]``,
    and d_1 into ``input_scaled`` (the input coupling's factor, for its MKL product with rho(x))."""
    n, batch = layout.shape[1] - 1, coef.shape[0]
    for k in range(1, n + 1):
        start, m, g = layout[START, k], layout[SIZE, k], bias_grads[k - 1]
        for j in range(m):
            g[j] = 0.0
        for e in range(batch):
            c, at = coef[e], start + e * m
            for j in range(m):
                v = c * (b[at + j] - a[at + j])
                d[at + j] = v
                g[j] += v
    start, m = layout[START, 1], layout[SIZE, 1]
    for i in range(batch * m):
        input_scaled[i] = d[start + i]


@_jit(inline="always")
def _rate_differences(first, second, r, slope, layout, params, coef, input_scaled, bias_grads):
    """r1 = rho(first) into ``r``; returns r2 = rho(second) and d = coef (r2 - r1) (:func:`_differences`, which also
    fills the biases' sums and ``input_scaled``)."""
    batch = coef.shape[0]
    r2, d = np.empty_like(r), np.empty_like(r)
    fill_all_rates(first, r, slope, layout, params, batch)
    fill_all_rates(second, r2, slope, layout, params, batch)
    _differences(r, r2, layout, coef, d, input_scaled, bias_grads)
    return r2, d


@_jit(inline="always")
def _estimate(first, second, r, slope, layout, params, coef, input_scaled, bias_grads, weight_grads):
    """-(w/B) (dE/dtheta(second) - dE/dtheta(first)) (``ep_difference``): d_k = coef (r2 - r1) per free layer, its
    batch sum (bias), d_k^T r2_{k-1} + r1_k^T d_{k-1} (W_k, k >= 2); d_1 goes to ``input_scaled`` for W_1."""
    n, batch = layout.shape[1] - 1, coef.shape[0]
    r2, d = _rate_differences(first, second, r, slope, layout, params, coef, input_scaled, bias_grads)
    for k in range(2, n + 1):
        m, width, g = layout[SIZE, k], layout[SIZE, k - 1], weight_grads[k - 2]
        top, below = layout[START, k], layout[START, k - 1]
        for j in range(m):
            row = g[j]
            for i in range(width):
                row[i] = 0.0
        for e in range(batch):
            at = below + e * width
            lower_d, lower_r = d[at:at + width], r2[at:at + width]
            for j in range(m):
                a, c, row = d[top + e * m + j], r[top + e * m + j], g[j]
                for i in range(width):
                    row[i] += a * lower_r[i] + c * lower_d[i]


@_jit(inline="always")
def _stdp_ends(first, second, r, slope, layout, params, coef, form, input_scaled, bias_grads):
    """The STDP sums that telescope (``STDP.accumulate``): the biases' and the input coupling's, from the phases'
    last states (both phases start at the free state): coef (s2 - s1), or coef (rho(s2) - rho(s1)) for Xie-Seung."""
    if form == PLAIN:
        _differences(first, second, layout, coef, np.empty_like(r), input_scaled, bias_grads)
    else:
        _rate_differences(first, second, r, slope, layout, params, coef, input_scaled, bias_grads)


@_jit(inline="always")
def _predict(free, r, slope, rows, statics, target, layout, params, weights, prediction, cost):
    """The class prediction at the free state (argmax of the output; among tied units the largest field wins,
    as ``Cost.predict``) and the squared-error cost 1/2 ||y - d||^2 per example."""
    n, batch = layout.shape[1] - 1, statics[0].shape[0]
    m, start = layout[SIZE, n], layout[START, n]
    fill_all_rates(free, r, slope, layout, params, batch)
    for b0 in range(0, batch, 4):
        block = min(4, batch - b0)
        _fields(r, statics, b0, block, n, layout, weights, rows)
        for b in range(b0, b0 + block):
            y, h, d = free[start + b * m:start + (b + 1) * m], rows[b - b0], target[b * m:(b + 1) * m]
            top, best, choice, total = y[0], h[0], 0, 0.0
            for j in range(m):
                total += 0.5 * (y[j] - d[j]) * (y[j] - d[j])
                if y[j] > top or (y[j] == top and h[j] > best):
                    top, best, choice = y[j], h[j], j
            prediction[b], cost[b] = choice, total


@_jit(inline="always")
def _free_phase(free, r, slope, rows, statics, layout, params, weights, solver, rate, steps, project, tol, check_every):
    """The free phase in place, in stretches up to each check as ``relax`` runs it: every ``check_every`` steps and
    at the last one the state must be finite, and with ``tol`` >= 0 the phase stops once the residual (the last
    step's max|ds| / eps, or a sweep's max change / omega) is <= tol. Returns the steps taken, negated when the
    state stopped being finite."""
    none, step = np.zeros(1, free.dtype), 0
    while step < steps:
        count = min(check_every - step % check_every, steps - step)
        step += count
        measure = tol >= 0 and (step % check_every == 0 or step == steps)
        if solver == EULER:
            residual = euler_steps(free, r, slope, rows, statics, none, none, layout, params, weights, rate, count,
                                   measure, YES, project, NO)
        else:
            residual = block_sweeps(free, r, slope, rows, statics, none, none, layout, params, weights, rate, count,
                                    measure, NO)
        if not _finite(free):
            return -step
        if measure and residual <= tol:
            break
    return step


@_jit
def ep_step(free, statics, target, betas, nudged, layout, params, weights, form, solver, eps, omega, factor,
            free_steps, nudge_steps, project, tol, check_every, coef, input_scaled, bias_grads, weight_grads,
            prediction, cost):
    """The step between the two products: the free phase in ``free`` (in place; ``tol`` < 0: no early stop), the
    phases nu_1, nu_2 (``betas`` per example; where ``nudged[p]`` is 0 the phase is the free state itself), the
    estimate (``form``: EP's, or the STDP rule's, whose nudged phases are Euler steps), the prediction and the
    cost. Returns (0, free steps taken), or (1 + the phase: 0 free, 1 and 2 nudged, the step) where the state
    stopped being finite."""
    n = layout.shape[1] - 1
    r, slope, rows = np.empty_like(free), np.empty_like(free), np.empty((4, layout[SIZE, 1:].max()), free.dtype)
    taken = _free_phase(free, r, slope, rows, statics, layout, params, weights, solver, eps if solver == EULER else
                        omega, free_steps, project, tol, check_every)
    if taken < 0:
        return 1, -taken
    stepwise = form == PLAIN or form == XIE_SEUNG
    if stepwise:
        for k in range(2, n + 1):
            weight_grads[k - 2][:] = 0.0
    ends = [free, free]
    for p in range(2):
        if nudged[p] and stepwise:  # -(A(nu_2) - A(nu_1)): phase 2's products with coef, phase 1's with -coef
            ends[p] = _stdp_phase(free, r, slope, rows, statics, target, betas[p], layout, params, weights, eps,
                                  factor, nudge_steps, project, form, coef if p == 1 else -coef, weight_grads)
        elif nudged[p]:
            nudged_solver = solver if form == EP else EULER
            ends[p] = _nudged_phase(free, r, slope, rows, statics, target, betas[p], layout, params, weights,
                                    nudged_solver, eps if nudged_solver == EULER else omega, factor, nudge_steps,
                                    project)
        if nudged[p] and not _finite(ends[p]):
            return 2 + p, nudge_steps
    if stepwise:
        _stdp_ends(ends[0], ends[1], r, slope, layout, params, coef, form, input_scaled, bias_grads)
    else:  # EP, and STDP's tied form, whose sum over the steps is EP's difference of the phases' ends
        _estimate(ends[0], ends[1], r, slope, layout, params, coef, input_scaled, bias_grads, weight_grads)
    _predict(free, r, slope, rows, statics, target, layout, params, weights, prediction, cost)
    return 0, taken


def compiled_step(rule, network, x: Tensor, target: Tensor, state=None, generator=None, form: str = "ep"):
    """``rule.compute_grads(network, x, target, state, generator)`` through :func:`ep_step`, or None where it does not
    apply (see the module's docstring; decided before anything is drawn from ``generator`` or validated twice); the
    caller then runs the general path. ``form``: ``"ep"`` for ``EquilibriumProp``, the form of an ``STDP`` rule."""
    batch = (x if state is None else state[0]).shape[0]
    plan = _plan(rule, network, batch, target, FORMS[form])
    if plan is None:
        return None
    weights, layout = plan
    relax, n, dtype, np_dtype = rule.relaxation, len(weights), weights[0].dtype, layout.kernels.params.dtype
    if state is None:  # the rest state s = 0 (init_state) without its zero tensors: the buffer is zeroed below
        start = [*network.clamped_inputs(x), *[None] * n]
    else:
        network.check_state(state)
        start = state
    if any(t is not None and t.dtype != dtype for t in start):
        return None
    nus = rule.nudges(batch, generator, dtype, network.device)
    betas, nudged, coef = _phase_arrays(nus, batch, np_dtype)
    with torch.no_grad():
        input_rate = network.rhos[0].rho(start[0])  # rho(x), read by both MKL products
        static = network.static_fields(start, [input_rate, *[None] * n])  # bias + input drive: the first product
        free = torch.zeros(layout.length, dtype=dtype) if state is None else torch.empty(layout.length, dtype=dtype)
        views = layout.views(free)
        if state is not None:
            for k in range(1, n + 1):
                views[k].copy_(state[k])
        sizes = network.sizes
        input_scaled = torch.empty(batch, sizes[1], dtype=dtype)
        bias_grads = [torch.empty(sizes[k], dtype=dtype) for k in range(1, n + 1)]
        weight_grads = [torch.empty(sizes[k], sizes[k - 1], dtype=dtype) for k in range(2, n + 1)]
        prediction, cost = torch.empty(batch, dtype=torch.int64), torch.empty(batch, dtype=dtype)
        euler = relax.method == "euler"
        status, steps = ep_step(free.numpy(), tuple(static[k].numpy() for k in range(1, n + 1)),
                                target.detach().contiguous().numpy().reshape(-1), betas, nudged, layout.kernels.layout,
                                layout.kernels.params, layout.kernels.weights, FORMS[form], EULER if euler else ASYNC,
                                np_dtype.type(relax.eps), np_dtype.type(relax.omega), _nudge_factor(relax),
                                relax.free_steps, relax.nudge_steps, relax.project,
                                -1.0 if relax.tol is None else float(relax.tol), relax.check_every, coef,
                                input_scaled.numpy().reshape(-1),
                                tuple(g.numpy() for g in bias_grads), tuple(g.numpy() for g in weight_grads),
                                prediction.numpy(), cost.numpy())
        if status:
            _diverged(status, steps, relax, nus)
        x = start[0].detach() if start[0].requires_grad else start[0]  # the input itself, as relax returns it
        grads = {id(weights[0]): torch.mm(input_scaled.T, input_rate)}  # the second MKL product
    grads.update((id(w), g) for w, g in zip(weights[1:], weight_grads))
    grads.update((id(network.bias(k)), g) for k, g in zip(range(1, n + 1), bias_grads))
    params = list(network.parameters())
    accumulate_grads(params, [grads[id(p)] for p in params], owned=True)
    return StepResult([x, *views[1:]], cost, prediction, steps)


def _phase_arrays(nus, batch: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _plan(rule, network, batch: int, target: Tensor, form: int):
    """(W_1..W_n, the chain's layout) when the compiled step applies to this rule, network and target, else None.
    Cheap checks only: no device read, nothing drawn."""
    relax = rule.relaxation
    if (native.numba is None or type(relax) is not Relaxation or not relax.native
            or not (relax.tol is None or isinstance(relax.tol, int | float) and 0 <= relax.tol < math.inf)
            or not isinstance(relax.check_every, int) or relax.check_every < 1
            or type(rule.cost) is not SquaredError or relax.method not in ("euler", "async")
            or relax.nudge_scale not in ("eps", "none") or not _plain_count(relax.free_steps)
            or not _plain_count(relax.nudge_steps) or not isinstance(relax.eps, int | float)
            or not 0 < relax.eps < math.inf or autocast_enabled(target.device.type)):
        return None
    if relax.method == "async" and form == EP:  # a concave nudge (1 + beta' <= 0): the general path's minimiser
        # (the STDP rule's nudged phases are Euler steps whatever solved the free phase)
        b = rule.beta
        betas = {"positive": (b,), "negative": (-b,)}.get(rule.variant, (b, -b))
        if any(1.0 + _nudge_factor(relax) * beta <= 0 for beta in betas):
            return None
    weights = dense_chain(network)
    if (weights is None or weights[0].device.type != "cpu" or target.dtype != weights[0].dtype
            or tuple(target.shape) != (batch, network.sizes[-1])):
        return None
    layout = ChainLayout.of(network, weights, batch, True)
    return None if layout.kernels is None else (weights, layout)


def _nudge_factor(relax) -> float:
    """beta' / beta (BF-9, THEORY A1): the Euler nudge's k = c beta / eps and the block minimiser's a = 1 + beta'."""
    return 1.0 if relax.nudge_scale == "eps" else 1.0 / relax.eps


def _plain_count(steps) -> bool:
    return isinstance(steps, int) and steps >= 0


def _diverged(status: int, steps: int, relax, nus) -> None:
    phase = "free" if status == 1 else "nudged"
    beta = nus[status - 2] if status > 1 else 0.0
    beta_text = "per-example" if isinstance(beta, Tensor) else f"{beta:g}"
    raise DivergenceError(
        f"relaxation diverged: non-finite state by step {steps} of the {phase} phase (eps={relax.eps:g}, "
        f"beta={beta_text}); reduce eps (stable when eps < 2/lambda_max(H)) or beta")
