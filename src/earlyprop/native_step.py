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

It applies when the general path would run the kernels anyway (``Relaxation.native``,
:func:`earlyprop.native_chain.fits`) and nothing asks for more than the step computes: ``EquilibriumProp`` or
``STDP`` itself with a ``Relaxation`` and the squared-error cost, a target shaped like the output layer, no autocast,
and, for EP's block solver, a convex nudge (1 + beta' > 0). A ``tol`` stops the free phase as ``relax`` does
(checked every ``check_every`` steps, the steps taken reported). The Python around the call, and the decision, is
:mod:`earlyprop.step_plan`.
"""

from __future__ import annotations

import numpy as np

from earlyprop.native import (
    HARD,
    LINEAR,
    SIZE,
    START,
    _clip,
    _copy,
    _fields,
    _jit,
    _smooth_rates,
    block_sweeps,
    euler_steps,
    fill_all_rates,
)

EULER, ASYNC = 0, 1
EP, PLAIN, XIE_SEUNG, TIED = 0, 1, 2, 3  # the estimate: EP's, or the STDP rule's form (BF-17)
FORMS = {"ep": EP, "plain": PLAIN, "xie_seung": XIE_SEUNG, "tied": TIED}
# the kernels' flags as numpy scalars: numba compiles a function once more for each literal argument (True, 1) a
# compiled caller passes (seconds each); numpy scalars are typed like the values Python passes
YES, NO, ONE = np.bool_(True), np.bool_(False), np.int64(1)


@_jit(inline="always")
def _finite(s) -> bool:
    """Whether every s is finite: inf * 0 is NaN, so the sum of s * 0 is 0 exactly when all are (one vectorised
    pass, no early exit to stop it)."""
    total = zero = s.dtype.type(0.0)
    for i in range(s.shape[0]):
        total += s[i] * zero
    return total == zero


@_jit
def input_rates(x, r, kind, lo, hi, gain, shift) -> bool:
    """rho(x) of the clamped input into ``r`` (both flat) by the kernels' rates (a ``native_chain.KINDS`` kind and
    ``native_chain.rate_params``); whether every x is finite, the input's check in the same call."""
    if kind == HARD:
        for i in range(x.shape[0]):
            r[i] = _clip(x[i], lo, hi)
    elif kind == LINEAR:
        _copy(x, r)
    else:
        _smooth_rates(x, r, np.empty_like(x), kind, gain, shift)
    return _finite(x)


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
