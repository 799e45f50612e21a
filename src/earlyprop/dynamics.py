"""One relaxation loop for every phase (THEORY §1.2, 1.3, 1.7, 1.8, 1.12; §5).

The leaky-integrator / Langevin update (BF-1 with the nudge of BF-9)::

    s <- s + eps * (R(s) - s) - c * beta * dC/ds + sqrt(2 eps T) * xi

with c = eps (``nudge_scale="eps"``, EP17 eq. 42, the default) or c = 1 (``"none"``,
ER19), optional projection onto the rate's bounds (EP17 eq. 43), and clamped layers left
untouched. Free phase: beta = 0. Nudged phase: beta != 0 (either sign, or one per example).
Noisy phase: T > 0. Newton polishing of fixed points lives in :func:`earlyprop.newton.polish`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from earlyprop.chain import Chain
from earlyprop.chain_loops import repeated
from earlyprop.cost import Cost, SquaredError
from earlyprop.network import Network, State, all_finite
from earlyprop.nudge import Nudge, check_nudge_fits, make_nudge
from earlyprop.solvers import (
    block_sweep,
    check_block_solvable,
    device_max,
    max_change,
    nudge_curvature,
    parity_groups,
)

NUDGE_SCALES = ("eps", "none")
METHODS = ("euler", "async")


class DivergenceError(FloatingPointError):
    """The state became non-finite during a relaxation."""


@dataclass
class Diagnostics:
    """What a relaxation did: steps taken, final residual max|ds/dt| (noise excluded),
    whether ``tol`` was met, and, on request, the energy trace and the trajectory."""

    steps: int
    residual: float
    converged: bool
    energy: list[float] | None = None
    trajectory: list[State] | None = field(default=None, repr=False)


def internal_force(
    network: Network, state: Sequence[Tensor], rho_prime_factor: bool = True, static: list | None = None
) -> list[Tensor | None]:
    """-dE/ds = R(s) - s on free layers (BF-3); None on clamped layers.

    ``rho_prime_factor=False`` gives the textbook leaky integrator b + W rho(s) - s, which is
    not a gradient flow (THEORY A6): an ablation only.
    """
    fields = network.fields(state, static=static)
    out: list[Tensor | None] = [None] * len(state)
    for layer in network.free:
        drive = fields[layer] * network.rhos[layer].rho_prime(state[layer]) if rho_prime_factor else fields[layer]
        out[layer] = drive - state[layer]
    return out


def relax(
    network: Network,
    state: Sequence[Tensor],
    *,
    steps: int,
    eps: float,
    beta: float | Tensor = 0.0,
    target: Tensor | None = None,
    cost: Cost | None = None,
    temperature: float = 0.0,
    noise_std: float | None = None,
    generator: torch.Generator | None = None,
    project: bool = False,
    nudge_scale: str = "eps",
    tol: float | None = None,
    check_every: int = 10,
    fixed_layers: Sequence[int] = (),
    rho_prime_factor: bool = True,
    record_energy: bool = False,
    record_trajectory: bool = False,
    differentiable: bool = False,
    method: str = "euler",
    static: Sequence[Tensor | None] | None = None,
    omega: float = 1.0,
    validate: bool = True,
    final_residual: bool = True,
    native: bool = True,
    cuda_graphs: bool = True,
) -> tuple[State, Diagnostics]:
    """Run the leaky-integrator / Langevin dynamics from ``state`` and return the final state.

    Parameters
    ----------
    steps : maximum number of Euler steps.
    eps : time step Delta t / tau (> 0).
    beta, target, cost : the nudge (BF-9); beta = 0 is the free phase.
    temperature : Langevin temperature T >= 0; the noise variance is 2 eps T (THEORY A4).
        ``noise_std`` overrides the per-step standard deviation.
    generator : seeded torch.Generator for the noise. Two chains given generators with the
        same seed see the same noise (common random numbers, T12).
    project : clip each layer onto its rate's bounds after every step (EP17 eq. 43).
    nudge_scale : ``"eps"`` (EP17 eq. 42) or ``"none"`` (ER19), THEORY A1.
    tol : stop once the residual max|ds/dt| is <= tol (checked every ``check_every`` steps).
    check_every : steps between checks. The loop reads the device (a host sync on a GPU) only there: once per
        check for finiteness, once more for the residual when ``tol`` is set; plus a fixed few per phase (input
        validation, the final residual). Never every step, unless ``record_energy`` asks for a value per step
        (tests/speed/test_host_syncs.py).
    fixed_layers : free layers held at their current value (e.g. a clamped output).
    record_energy : keep mean_batch F(s) = E + beta C after every step.
    record_trajectory : keep a copy of the state after every step (memory O(steps)).
    differentiable : keep the autograd graph through the steps (truncated BPTT references);
        by default the loop runs under ``torch.no_grad``.
    method : ``"euler"`` (the leaky integrator above, what theory checks use) or ``"async"``: exact
        block minimisation of even then odd layers per step (SC23; see :mod:`earlyprop.solvers`),
        same fixed points, for layered hard-sigmoid/linear nets; its residual is max|s change| per sweep / omega.
    omega : over-relaxation of the asynchronous solver, 0 < omega < 2: each block moves omega of the way to its
        minimiser, then is projected (projected block SOR). 1 (default) is SC23's exact block update; the
        fixed points do not depend on omega, and each block update lowers the energy (:mod:`earlyprop.solvers`).
    validate : scan the start state for NaN/inf (shapes are always checked). False for a state this library made
        and already checked: ``init_state`` of a checked input, or the result of a previous relax (a relax of
        at least one step checks its last step), as the learning rules' phases do; one device read per layer saved.
    final_residual : when the loop did not measure it (``tol`` None or not met), evaluate the residual at the
        returned state (one more field evaluation and a device read); False leaves ``Diagnostics.residual`` NaN.
    static : ``network.static_fields(state)`` (bias + drive of the clamped layers), computed here when None;
        passing it lets the phases of one batch share the input drive, which is constant while x is clamped.
    native : on CPU, run the lean chain's steps in the compiled kernels of :mod:`earlyprop.native` where they
        apply (numba installed; linear, hard-sigmoid, logistic or tanh layers; small products): same results up
        to round-off. False: the torch loops.
    cuda_graphs : on CUDA, run the lean chain's stretches of steps between checks as CUDA graphs, captured once
        and replayed (:mod:`earlyprop.cuda_graphs`): one launch per stretch instead of a few per step, the same
        kernels on the same values (1.1-2.5x faster per batch on an H200, BENCHMARKS.md). No effect on CPU, or
        where the lean chain does not run. False: the steps launched one by one.

    On a plain layered chain (no extras: see :class:`earlyprop.chain.Chain`) the same loop runs lean,
    with the same results up to round-off; the free layers of the returned state are then views of one buffer
    (on CPU the narrow ones, such as a class output, unit-major: non-contiguous (batch, n) views).

    Raises
    ------
    ValueError on bad arguments; DivergenceError when the state becomes non-finite.
    """
    _check_arguments(network, state, steps, eps, temperature, nudge_scale, check_every, noise_std, validate)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_omega(omega, method)
    with torch.enable_grad() if differentiable else torch.no_grad():
        nudge = make_nudge(beta, target, cost)
        check_nudge_fits(network, nudge, state)
        sigma = noise_std if noise_std is not None else math.sqrt(2.0 * eps * temperature)
        nudge_factor = eps if nudge_scale == "eps" else 1.0
        moving = [layer for layer in network.free if layer not in set(fixed_layers)]
        bounds = {layer: network.rhos[layer].bounds if project else None for layer in moving}

        if static is None:
            static = network.static_fields(state)  # bias + input drive: constant during a phase
        # the lean loops of chain.Chain: same equations, for the plain layered chain without the extras
        lean = not (differentiable or sigma > 0 or fixed_layers or not rho_prime_factor) and (
            nudge is None or type(nudge.cost) is SquaredError)
        chain = Chain.of(network, state, static, nudge, native, cuda_graphs, steps) if lean else None
        if chain is not None:
            s = chain.state
        else:
            s = list(state) if differentiable else [t.detach().clone() for t in state]
        if method == "async":
            if sigma > 0:
                raise ValueError("the asynchronous solver is deterministic: use method='euler' for T > 0")
            check_block_solvable(network, moving, nudge is not None, nudge.cost if nudge else None)
            beta_scale = 1.0 if nudge_scale == "eps" else 1.0 / eps
            groups = parity_groups(moving)
        if chain is not None:
            advance = chain.block_stepper(groups, nudge, beta_scale, omega) if method == "async" else \
                chain.euler_stepper(eps, nudge, nudge_factor, project)
        elif method == "async":
            # the nudged layer's curvature, once per phase: with a per-example beta its sign test reads the device
            curvature = nudge_curvature(nudge, beta_scale, s[network.driven]) if nudge is not None else None
            rates = network.rates(s)  # once per phase: block_sweep keeps them current as it moves s

            def advance(measure: bool) -> float | None:
                before = [t.clone() for t in s] if measure else None
                for group in groups:
                    block_sweep(network, s, group, nudge, beta_scale, inplace=not differentiable, static=static,
                                curvature=curvature, omega=omega, rates=rates)
                return max_change(before, s, moving) / omega if measure else None
        else:
            def advance(measure: bool) -> float | None:
                force = internal_force(network, s, rho_prime_factor, static)
                deltas = {layer: eps * force[layer] for layer in moving}
                if nudge is not None and network.driven in deltas:
                    deltas[network.driven] = deltas[network.driven] - nudge_factor * nudge.force(s[network.driven])
                res = _residual(s, deltas, bounds, eps) if measure else None
                for layer, delta in deltas.items():
                    if sigma > 0:
                        delta = delta + sigma * torch.randn(delta.shape, generator=generator, dtype=delta.dtype,
                                                            device=delta.device)
                    new = s[layer] + delta
                    lo_hi = bounds[layer]
                    s[layer] = new.clamp(*lo_hi) if lo_hi is not None else new
                return res

        advance = advance if chain is not None else repeated(advance)  # the chain's take a count already
        energy = [_mean_free_energy(network, s, nudge)] if record_energy else None
        trajectory = [list(s) if differentiable else [t.clone() for t in s]] if record_trajectory else None
        residual, converged, step = math.inf, False, 0
        while step < steps:  # in stretches up to the next check (single steps when every step is recorded)
            count = 1 if record_energy or record_trajectory else min(check_every - step % check_every, steps - step)
            step += count
            measure = tol is not None and (step % check_every == 0 or step == steps)
            res = advance(measure, count=count)
            if step % check_every == 0 or step == steps:
                _check_finite(s, moving, step, eps, beta, chain)
            if record_energy:
                energy.append(_mean_free_energy(network, s, nudge))
            if record_trajectory:
                trajectory.append(list(s) if differentiable else [t.clone() for t in s])
            if measure:
                residual = res
                if residual <= tol:
                    converged = True
                    break
        if not converged and not final_residual:
            residual = math.nan
        elif not converged:  # the residual at the returned state, which the loop has not measured
            if chain is not None:  # the Euler step's measure-only call, for the block solver too
                euler = advance if method == "euler" else chain.euler_stepper(eps, nudge, nudge_factor, project)
                residual = euler(True, commit=False)
            else:
                residual = advance_residual(network, s, moving, nudge, nudge_factor, eps, bounds, rho_prime_factor,
                                            static)
            converged = tol is not None and residual <= tol
        return chain.result() if chain is not None else s, Diagnostics(step, residual, converged, energy, trajectory)


def residual(
    network: Network, state: Sequence[Tensor], beta: float | Tensor = 0.0, target: Tensor | None = None,
    cost: Cost | None = None, project: bool = False,
) -> float:
    """max over free units of |dF/ds| = |R(s) - s - beta dC/ds| (THEORY A11).

    ``project``: the residual of the projected dynamics (EP17 eq. 43) with a unit step,
    max |clip(s - dF/ds) - s|: zero at a fixed point of ``relax(..., project=True)``, where units can rest on
    a bound of their rate with the force pointing outwards (there dF/ds itself is not zero).
    """
    nudge = make_nudge(beta, target, cost)
    check_nudge_fits(network, nudge, state)
    bounds = {layer: network.rhos[layer].bounds if project else None for layer in network.free}
    with torch.no_grad():
        return advance_residual(network, list(state), list(network.free), nudge, 1.0, 1.0, bounds, True)


def advance_residual(network, s, moving, nudge, nudge_factor, eps, bounds, rho_prime_factor, static=None) -> float:
    force = internal_force(network, s, rho_prime_factor, static)
    deltas = {layer: eps * force[layer] for layer in moving}
    if nudge is not None and network.driven in deltas:
        deltas[network.driven] = deltas[network.driven] - nudge_factor * nudge.force(s[network.driven])
    return _residual(s, deltas, bounds, eps)


def _residual(s, deltas, bounds, eps) -> float:
    """max over layers of max|projected step| / eps, read from the device once (not once per layer)."""
    worst = []
    for layer, delta in deltas.items():
        lo_hi = bounds[layer]
        step = (s[layer] + delta).clamp(*lo_hi) - s[layer] if lo_hi is not None else delta
        if step.numel():
            worst.append(step.detach().abs().max())
    return device_max(worst) / eps


def _mean_free_energy(network: Network, s: State, nudge: Nudge | None) -> float:
    e = network.energy(s)
    if nudge is not None:
        e = e + nudge.value(s[network.driven])
    return float(e.mean())


def _check_finite(s: State, moving: Sequence[int], step: int, eps: float, beta, chain: Chain | None = None) -> None:
    """Raise DivergenceError unless the moving layers are finite: one host sync (the loop calls it every
    ``check_every`` steps and at the last one, never every step)."""
    if chain.finite() if chain is not None else _layers_finite([s[layer] for layer in moving]):
        return
    beta_text = "per-example" if isinstance(beta, Tensor) else f"{beta:g}"
    raise DivergenceError(
        f"relaxation diverged: non-finite state by step {step} (eps={eps:g}, beta={beta_text}); "
        "reduce eps (stable when eps < 2/lambda_max(H)) or beta"
    )


def _layers_finite(tensors: Sequence[Tensor]) -> bool:
    """``all(all_finite(t) for t in tensors)`` with one device read: the sum of the layers' sums is finite unless
    some element is not (or finite values overflowed, which the exact per-layer check then sorts out)."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if len(tensors) < 2 or len({(t.dtype, t.device) for t in tensors}) > 1 or not tensors[0].is_floating_point():
        return all(all_finite(t) for t in tensors)
    return math.isfinite(float(torch.stack([t.sum() for t in tensors]).sum())) or all(all_finite(t) for t in tensors)


def check_omega(omega: float, method: str) -> None:
    """Raise ValueError unless 0 < omega < 2, and omega = 1 unless the solver is the asynchronous one."""
    if not isinstance(omega, int | float) or not 0.0 < omega < 2.0:
        raise ValueError(f"omega (over-relaxation) must be in (0, 2), got {omega!r}")
    if omega != 1.0 and method != "async":
        raise ValueError(f"omega = {omega} over-relaxes the asynchronous solver only; use method='async'")


def _check_arguments(network, state, steps, eps, temperature, nudge_scale, check_every, noise_std,
                     validate: bool = True) -> None:
    if not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature T must be >= 0, got {temperature!r}")
    if noise_std is not None and (not math.isfinite(noise_std) or noise_std < 0):
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    if nudge_scale not in NUDGE_SCALES:
        raise ValueError(f"nudge_scale must be one of {NUDGE_SCALES}, got {nudge_scale!r}")
    network.check_state(state, values=validate)
