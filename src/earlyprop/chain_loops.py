"""The torch loops of the lean chain (:class:`earlyprop.chain.Chain`), where the compiled kernels do not run: the
leaky-integrator Euler step of BF-1 with the nudge of BF-9 (:func:`euler_loop`) and the exact block updates of SC23
(:func:`block_loop`), each step a list of torch calls bound to the chain's buffers, replayed from step to step (or,
on CUDA, captured as graphs: :func:`repeated`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from earlyprop import native, small_gemm
from earlyprop.cuda_graphs import StepGraphs
from earlyprop.solvers import nudged_minimiser, on_concave_rows

if TYPE_CHECKING:
    from earlyprop.chain import Chain


def euler_loop(chain: Chain, eps: float, nudge, nudge_factor: float, project: bool) -> Callable:
    """``advance(measure, commit=True, count=1)``: ``count`` leaky-integrator steps (BF-1 with the nudge of
    BF-9), in place, the last one measured when ``measure``.

    s + eps (R - s) - c beta (s - d) = lerp(s, G, eps) with G = R - k (s - d), k = c beta / eps, so the whole
    update is one lerp over the flat buffer; on the driven layer k d joins the static field. With
    ``commit=False`` it only measures the step (the residual max|step| / eps), leaving the state alone.
    """
    chain.prepare_torch_loops()
    n, layers = chain.n, range(1, chain.n + 1)
    plan = chain.clamp_plan(layers) if project else []
    eps_t = chain.scalar(eps)
    if nudge is not None:
        beta = nudge.beta[:, None] if isinstance(nudge.beta, Tensor) else nudge.beta
        k = nudge_factor * beta / eps
        k = chain.kept("nudge k", k) if isinstance(k, Tensor) else k
        pull = chain.kept("pull", k * nudge.target)
        static_pulled = chain.kept("static pulled", chain.static[n] + pull)
        pull_back = partial(chain.h[n].addcmul_, chain.s[n], k, value=-1.0) if isinstance(k, Tensor) \
            else partial(chain.h[n].add_, chain.s[n], alpha=-k)  # the -k s of G on the driven layer

    scaled: dict[float, list] = {}  # statics times the field factor of rates(), made once per factor
    replay: dict[tuple, list] = {}  # the drive's calls per set of plain layers, when the rates are fixed

    def drive_calls() -> list:
        """rho, the fields, rho' and the nudge: G of the docstring into the field buffer, as bound calls."""
        key = tuple(chain.plain)
        if key in replay:
            return replay[key]
        fixed = chain.fixed_rates()
        calls, r, slope, alpha = fixed if fixed is not None else ([], *chain.rates())
        statics = [None] * (n + 1)
        if alpha != 1.0:
            if alpha not in scaled:
                scaled[alpha] = [None, *(chain.kept(f"scaled static {j}", alpha * st)
                                         for j, st in enumerate(chain.static[1:], 1))]
            statics = scaled[alpha]
        elif nudge is not None and chain.plain[n]:
            statics[n] = static_pulled
        calls = [*calls, *(call for j in layers for call in chain.field_calls(r, j, chain.h[j], statics[j], alpha))]
        if isinstance(slope, Tensor):
            calls.append(partial(chain.hflat.mul_, slope))
        elif slope is not None:
            calls += [partial(chain.h[j].mul_, slope[j]) for j in layers if slope[j] is not None]
        if nudge is not None:
            if statics[n] is not static_pulled:
                calls.append(partial(chain.h[n].add_, pull))
            calls.append(pull_back)
        if fixed is not None:  # every tensor bound here stays the same from step to step
            replay[key] = calls
            small_gemm.link(calls)
        return calls

    fused: list = []  # step(False) as the products and one compiled update, made once every layer is plain
    bounds = _one_interval(chain, plan)
    fusable = chain.layout.fused_update and chain.graphs is None and bounds is not None

    def fused_calls() -> list | None:
        """The products without the static fields (the nudge's -k s term on the driven layer's) and
        :func:`earlyprop.native.move_toward_fields`, which adds them in its pass: where the layout allows it
        (:func:`_one_interval`) and every layer is plain (then it stays so)."""
        if not fused and all(chain.plain[1:]):
            move = _fused_move(chain, bounds, eps, static_pulled if nudge is not None else None)
            fused.extend(call for j in layers
                         for call in chain.field_calls(chain.s, j, chain.h[j], products_only=True))
            fused.extend([pull_back, move] if nudge is not None else [move])
            small_gemm.link(fused)
        return fused or None

    def step(measure: bool, commit: bool = True) -> float | None:
        if not measure and fusable and fused_calls() is not None:
            for call in fused:
                call()
            return None
        for call in drive_calls():
            call()
        if not measure:
            chain.clamp(chain.flat.lerp_(chain.hflat, eps_t), plan, layers)
            return None
        new, plain = torch.lerp(chain.flat, chain.hflat, eps), list(chain.plain)
        chain.clamp(new, plan, layers)
        step = new - chain.flat if commit else new.sub_(chain.flat)
        worst = float(step.abs_().max()) / eps if step.numel() else 0.0
        if commit:
            chain.flat.copy_(new)
        else:
            chain.plain = plain
        return worst

    def fixed_calls() -> list | None:
        """step(False) as bound calls, once its calls are fixed and leave the plain flags as they are."""
        if any(chain.hard[j] and chain.plain[j] != bool(plan) for j in layers):
            return None
        if tuple(chain.plain) not in replay and chain.fixed_rates() is None:
            return None
        return [*drive_calls(), partial(chain.flat.lerp_, chain.hflat, eps_t),
                *(partial(run.clamp_, *b) for _, _, b, run in plan)]

    return repeated(step, chain.graphs, fixed_calls)


def block_loop(chain: Chain, groups: list[list[int]], nudge, beta_scale: float, omega: float,
               curvature: tuple | None) -> Callable:
    """``advance(measure, count=1)``: ``count`` sweeps of exact block minimisation (SC23), as ``block_sweep``
    computes them, over-relaxed by ``omega`` (the minimisers go to the field buffer, then one lerp per parity
    group); ``curvature``: the nudged layer's, from ``solvers.nudge_curvature``."""
    chain.prepare_torch_loops()
    n, plans = chain.n, [chain.clamp_plan(group) for group in groups]
    if nudge is not None:
        a, convex = curvature
        a = chain.kept("curvature", a) if isinstance(a, Tensor) else chain.scalar(a)  # 0-d: no per-call wrapping
        beta = nudge.beta[:, None] if isinstance(nudge.beta, Tensor) else float(nudge.beta)
        pull = chain.kept("pull", beta * beta_scale * nudge.target)  # in the order nudged_minimiser takes them
        static_pulled = chain.kept("static pulled", chain.static[n] + pull)
    relaxed = omega != 1.0
    target = chain.h if relaxed else chain.s  # where a block's minimiser goes
    runs = [_group_run(chain, group) for group in groups] if relaxed else None
    omega_t = chain.scalar(omega) if relaxed else None
    replay: list = []  # the whole sweep's calls, made once every layer is plain and stays so

    def group_calls(i: int, r: list, replayed: bool = False) -> list:
        """Group i's block update given the rates ``r``, as calls bound to their tensors; ``replayed``: the
        plain flags are settled (:meth:`replayable`), so the projection is the bare clamps."""
        calls: list = []
        for k in groups[i]:
            if k == n and nudge is not None and convex:
                calls += [*chain.field_calls(r, k, target[k], static_pulled), partial(target[k].div_, a)]
            elif k == n and nudge is not None:  # a bound on concave rows: the minimiser is a new tensor
                calls += [*chain.field_calls(r, k, chain.h[k]), partial(concave_minimiser, k)]
            else:
                calls += chain.field_calls(r, k, target[k])
        if relaxed:
            calls.append(partial(runs[i][0].lerp_, runs[i][1], omega_t))
            if nudge is not None and not convex and n in groups[i]:
                calls.append(keep_concave_rows)
        if replayed:
            return [*calls, *(partial(run.clamp_, *b) for _, _, b, run in plans[i])]
        return [*calls, partial(chain.clamp, chain.flat, plans[i], groups[i])]

    def concave_minimiser(k: int) -> None:
        target[k].copy_(nudged_minimiser(chain.h[k], nudge, beta_scale, chain.bounds[k], curvature,
                                         clip=not relaxed))

    def keep_concave_rows() -> None:
        chain.s[n].copy_(on_concave_rows(chain.s[n], chain.h[n], curvature))

    def fixed_calls() -> list | None:
        """A sweep as bound calls, once every layer is plain and stays so: then the rates are the state itself,
        sweep after sweep."""
        if not replay and chain.replayable(plans):
            replay.extend(call for i in range(len(groups)) for call in group_calls(i, chain.s, replayed=True))
            small_gemm.link(replay)
        return replay or None

    def sweep(measure: bool) -> float | None:
        fixed_calls()
        before = chain.flat.clone() if measure else None
        if replay:
            for call in replay:
                call()
        else:  # layers of one parity do not interact: each group reads the rates after the previous one
            for i in range(len(groups)):
                for call in group_calls(i, chain.rates()[0]):
                    call()
        if not measure:
            return None  # the change per sweep scales with omega: divide it out, so tol means one thing
        return float((chain.flat - before).abs().max()) / omega if before.numel() else 0.0

    return repeated(sweep, chain.graphs, fixed_calls)


def _one_interval(chain: Chain, plan: list) -> tuple[float, float] | None:
    """The interval one pass projects the whole state onto (unbounded with no projection), or None where a step
    needs more: a projection by layer, or a hard-sigmoid layer left unprojected (it would not stay plain)."""
    if not plan:
        return None if any(chain.hard[1:]) else (-np.inf, np.inf)
    return plan[0][2] if len(plan) == 1 and plan[0][:2] == (0, chain.flat.numel()) else None


def _fused_move(chain: Chain, bounds: tuple[float, float], eps: float, pulled: Tensor | None) -> Callable:
    """The compiled update s <- clip(s + eps (h + static - s), *bounds) over the whole state, bound to this chain's
    buffers and to a buffer of its static fields (the driven layer's with the nudge's pull, ``pulled``)."""
    dtype = chain.flat.numpy().dtype.type
    lo, hi = bounds
    static = chain.buffer("static fields")
    views = chain.views(static)
    for k in range(1, chain.n + 1):
        views[k].copy_(pulled if k == chain.n and pulled is not None else chain.static[k])
    return partial(native.move_toward_fields, chain.flat.numpy(), chain.hflat.numpy(), static.numpy(), dtype(eps),
                   dtype(lo), dtype(hi))


def _group_run(chain: Chain, group: list[int]) -> tuple[Tensor, Tensor]:
    """The slices of the state and field buffers that hold a parity group (contiguous: even layers first)."""
    lo, hi = min(chain.span[k][0] for k in group), max(chain.span[k][1] for k in group)
    if hi - lo != sum(chain.span[k][1] - chain.span[k][0] for k in group):
        raise AssertionError("a parity group is not contiguous in the flat layout")
    return chain.flat[lo:hi], chain.hflat[lo:hi]


def repeated(step: Callable, graphs: StepGraphs | None = None, fixed_calls: Callable | None = None) -> Callable:
    """``step(measure, **options)``, one step, as ``advance(measure, count=1, **options)``: ``count`` steps, the
    last one measured (and given the options). With ``graphs``, the unmeasured steps run as CUDA graphs of
    ``fixed_calls()`` where they are fixed (:meth:`earlyprop.cuda_graphs.StepGraphs.advance`)."""
    def advance(measure: bool, count: int = 1, **options) -> float | None:
        if graphs is None:
            for _ in range(count - 1):
                step(False)
            return step(measure, **options)
        last = bool(measure or options)  # a measured (or measure-only) step reads the device: never in a graph
        graphs.advance(step, fixed_calls, count - last)
        return step(measure, **options) if last else None

    return advance
