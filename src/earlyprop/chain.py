"""The lean layered chain: the relaxation loops of :func:`earlyprop.dynamics.relax` on bare tensors.

For a plain layered net (input clamped, output driven, one ``Dense`` term per consecutive pair) ``relax``
runs these loops instead of the general one: the same equations (the Euler step of BF-1 with the nudge of
BF-9, and the block updates of :mod:`earlyprop.solvers`), with the free layers in one flat buffer so that
each step is a handful of ops (issue 4; tests/speed/test_fast_paths.py compares the two loops). The steps run in
the compiled kernels (:mod:`earlyprop.native`) or the torch loops (:mod:`earlyprop.chain_loops`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from earlyprop import small_gemm
from earlyprop.chain_layout import ChainLayout, autocast_enabled, dense_chain
from earlyprop.chain_loops import block_loop, euler_loop
from earlyprop.chain_rates import slope_of, smooth_rate_calls
from earlyprop.native_chain import NativeChain
from earlyprop.network import Network, all_finite
from earlyprop.nonlinearity import Sigmoid, Tanh
from earlyprop.solvers import nudge_curvature

# On CPU, MKL multiplies a batch-sized block by a transposed view of W (the forward products) ~30% slower than by a
# contiguous matrix; a copy of W^T costs ~6 steps of that gain, so a phase this long multiplies by copies
# (BENCHMARKS.md, 2026-11-28 18:43-19:45: config D 0.961-0.969 of its time per batch, paired), or, where
# earlyprop.small_gemm runs, by packed copies of W and W^T (a pack costs about what a copy does).
LONG_PHASE = 32


class StepFields(list):
    """``network.static_fields`` of one training step, shared by its phases (the input is clamped in all of them),
    with the weights its phases packed (:meth:`Chain.packed`): the weights do not change between the phases of a
    step, so a matrix packed for the free phase serves the nudged ones too, whatever their length. Make a new one
    per step (``rules`` do): a pack is a copy, stale once an optimizer has moved the weights."""

    def __init__(self, fields, packs: dict | None = None):
        super().__init__(fields)
        self.packs: dict = {} if packs is None else packs  # shared with the step's other fields (stacked phases)


class Chain:
    """The plain layered chain x - h_1 - ... - h_L as bare tensors, for the lean loops of ``relax``.

    It applies when layer 0 is the only clamped layer, the last layer is driven, and the energy is one
    ``Dense`` term per consecutive pair and nothing else (:meth:`of` returns None otherwise and the general
    loop runs). Same equations as the general loop, hence the same states up to round-off (tests/speed).
    On CPU a small op costs 2-5 us whatever its size, so the savings are counted in ops per step:
    - all free layers live in ONE flat buffer (each layer a contiguous block of it, even layers first so a
      block-solver sweep is one run; row-major, or unit-major for narrow layers on CPU: see
      ``chain_layout.UNIT_MAJOR_WIDTH``), so the update, the projection and rho/rho' are one op for all layers;
    - fields go into a second flat buffer by ``addmm`` on the cached input drive; nothing is allocated;
    - hard-sigmoid layers skip rho/rho' once projected onto [0, 1], where rho(s) = s and rho'(s) = 1;
    - a step whose rates live in fixed tensors (plain layers, or uniform smooth rates in buffers made once) is
      built once as calls bound to those tensors and replayed: the Python that chooses the ops runs per phase,
      not per step.
    The free layers of the returned state are views of the flat buffer. With ``graphs`` (CUDA), stretches of fixed
    steps run as CUDA graphs (:mod:`earlyprop.cuda_graphs`): the buffers are then the layout's, kept from phase to
    phase, and :meth:`result` hands back a copy.
    """

    def __init__(self, layout: ChainLayout, state: Sequence[Tensor], static: Sequence, graphs: bool = False,
                 steps: int | None = None):
        self.layout, self.steps = layout, steps
        self.n, self.w, self.rhos, self.sizes = layout.n, layout.w, layout.rhos, layout.sizes
        n = self.n
        self.bounds, self.hard, self.uniform = layout.bounds, layout.hard, layout.uniform
        self.unit_major, self.span, self._scalars = layout.unit_major, layout.span, layout.scalars
        self.plain = list(layout.plain)  # rho(s) = s and rho'(s) = 1 right now: changes as layers are clipped
        self.graphs = layout.step_graphs() if graphs else None
        self.buffers = layout.phase_buffers() if self.graphs is not None else None
        # contiguous: addmm reads a stride-0 (expanded) bias ~30% slower than a materialised one (kept: copied so)
        self.static: list = [None, *(t.contiguous() if self.buffers is None else self.kept(f"static {k}", t)
                                     for k, t in enumerate(static[1:n + 1], 1))]
        self.flat = self.buffer("state")
        self.s = self.views(self.flat)
        self.hflat = self.h = None  # the torch loops' field buffer: prepare_torch_loops
        self.rbuf = self.pbuf = self.r = None  # rho(s) and rho'(s) of smooth rates, made on first use
        self._operands: dict = {}  # k -> W_k^T as torch multiplies by it (operand), made on use
        # the packed weights (Chain.packed): this training step's (StepFields), else this phase's own
        packs = getattr(static, "packs", None)  # (not `or {}`: the step's dict is empty until its first phase packs)
        self._packs: dict = {} if packs is None else packs
        for k in range(1, n + 1):
            self.s[k].copy_(state[k])
        self.native = NativeChain(self, layout.kernels) if layout.kernels is not None else None
        x = state[0]  # clamped: never written, so the returned state holds the input itself, as given
        self.state = [x.detach() if x.requires_grad else x, *self.s[1:]]

    def prepare_torch_loops(self) -> None:
        """What only the torch loops use, made on their first use (the compiled kernels run without it): the
        field buffer, and the plain marks of hard-sigmoid layers when the state is inside [0, 1]
        (the rest state, or the free state a nudged phase starts from): 2 ops instead of rho and rho' (5 ops)
        per step."""
        if self.hflat is None:
            self.hflat = self.buffer("fields")
            self.h = self.views(self.hflat)
        hard = [k for k in range(1, self.n + 1) if self.hard[k] and not self.plain[k]]
        if hard:  # clip(s) == s exactly iff every unit is in [0, 1] (a NaN compares unequal)
            runs = [run for _, _, _, run in self.clamp_plan(hard)]
            if all(torch.equal(run.clamp(0.0, 1.0), run) for run in runs):
                for k in hard:
                    self.plain[k] = True

    def operand(self, k: int, transposed: bool) -> Tensor:
        """W_k^T (``transposed``: the right operand of layer k's product from below) or W_k (from above, into layer
        k - 1) as torch multiplies by it: W_k^T a view, or a contiguous copy where that is faster
        (:data:`LONG_PHASE`: a long CPU phase, both layers row-major), made once per phase."""
        if not transposed:
            return self.w[k]
        if k not in self._operands:
            copy = self._long_cpu_phase() and not self.unit_major[k] and not self.unit_major[k - 1]
            self._operands[k] = self.w[k].t().contiguous() if copy else self.w[k].t()
        return self._operands[k]

    def _long_cpu_phase(self) -> bool:
        return (self.layout.device.type == "cpu" and self.graphs is None and self.steps is not None
                and self.steps >= LONG_PHASE)

    def product(self, a: Tensor, k: int, transposed: bool, out: Tensor, base: Tensor | None = None,
                alpha: float = 1.0, accumulate: bool = False) -> list[Callable]:
        """``out = base + alpha a @ W_k^T`` (``transposed``: the product from below; ``a @ W_k`` from above), as
        calls bound to their tensors; without ``base``, ``out = alpha a @ W``, or ``out += alpha a @ W`` with
        ``accumulate``. By :meth:`packed`'s matrix where there is one and ``alpha`` is 1, else by torch."""
        packed = self.packed(a, k, transposed, out) if alpha == 1.0 else None
        if packed is not None:
            call = packed.into(a, out, accumulate or base is not None)
            return [call] if base is None else [partial(out.copy_, base), call]
        b = self.operand(k, transposed)
        if base is not None:
            return [partial(torch.addmm, base, a, b, alpha=alpha, out=out)]
        if accumulate:
            return [partial(out.addmm_, a, b, alpha=alpha)]
        if alpha == 1.0:
            return [partial(torch.mm, a, b, out=out)]
        return [partial(torch.addmm, out, a, b, beta=0.0, alpha=alpha, out=out)]  # beta 0: out's values unread

    def packed(self, a: Tensor, k: int, transposed: bool, out: Tensor) -> small_gemm.PackedMatrix | None:
        """W_k^T (``transposed``) or W_k packed for :mod:`earlyprop.small_gemm`'s products of ``a`` into ``out``,
        where they run (``ChainLayout.packed_products``: numba's llvmlite, AVX-512, one thread, ``native``; CPU,
        no graphs; row-major operands): packed in a long phase (:data:`LONG_PHASE`), or taken from this training
        step's earlier phases (:class:`StepFields`) in a phase of any length; else None."""
        shape = (self.w[k].shape[1], self.w[k].shape[0]) if transposed else tuple(self.w[k].shape)
        if not (self.layout.packed_products and self.graphs is None and small_gemm.fits(a, shape, out)):
            return None
        key = (k, transposed, self.w[k].data_ptr())
        if key not in self._packs and self._long_cpu_phase():
            self._packs[key] = small_gemm.PackedMatrix(self.w[k].t() if transposed else self.w[k])
        return self._packs.get(key)

    @staticmethod
    def of(network: Network, state: Sequence[Tensor], static: Sequence, nudge=None, native: bool = True,
           graphs: bool = False, steps: int | None = None) -> Chain | None:
        """The chain of ``network``, or None where the general loop must run; ``native``: let the compiled CPU
        kernels of :mod:`earlyprop.native` run its steps where they apply; ``graphs``: run stretches of fixed steps
        as CUDA graphs (on CUDA; no effect elsewhere); ``steps``: the phase's budget, if known."""
        if autocast_enabled(state[0].device.type):  # its out= products need one dtype: mixed precision runs general
            return None
        weights = dense_chain(network)
        if weights is None:
            return None
        dtype = weights[0].dtype  # mixed dtypes promote the state in the general loop: leave them to it
        if any(t.dtype != dtype for t in state[1:]) or any(w.dtype != dtype for w in weights) or (
                nudge is not None and (nudge.target.dtype != dtype or
                                       (isinstance(nudge.beta, Tensor) and nudge.beta.dtype != dtype))):
            return None
        return Chain(ChainLayout.of(network, weights, state[0].shape[0], native), state, static, graphs, steps)

    def buffer(self, name: str) -> Tensor:
        """A scratch buffer laid out like the state: the layout's own in graph mode, else a new one."""
        if self.buffers is None:
            return torch.empty(self.layout.length, dtype=self.layout.dtype, device=self.layout.device)
        return self.buffers.empty(name, (self.layout.length,), self.layout.dtype, self.layout.device)

    def kept(self, name: str, value: Tensor) -> Tensor:
        """A phase's tensor that steps are bound to: in graph mode copied into the layout's buffer of that name, so
        that the next phase's steps are bound to the same memory (and replay the same graphs)."""
        return value if self.buffers is None else self.buffers.keep(name, value)

    def result(self) -> list:
        """The state to hand back: the chain's own views, or in graph mode a copy, which the next phase keeps."""
        if self.buffers is None:
            return self.state
        return [self.state[0], *self.views(self.flat.clone())[1:]]

    def scalar(self, value: float) -> Tensor:
        """A 0-d tensor for ``value``, made once per layout and never written (see chain_rates.smooth_rate_calls)."""
        if value not in self._scalars:  # a fill on the device: torch.tensor(value, device=cuda) would copy and sync
            self._scalars[value] = torch.full((), value, dtype=self.flat.dtype, device=self.flat.device)
        return self._scalars[value]

    def views(self, flat: Tensor) -> list:
        """Per-layer (batch, n_k) views of a flat buffer laid out like the state's (:meth:`ChainLayout.views`)."""
        return self.layout.views(flat)

    def rates(self) -> tuple[list, Tensor | list | None, float]:
        """rho(s_k) per layer, rho'(s_k) (flat, per layer, or None when every layer is plain), and the factor
        the fields must carry: the logistic rate's gain, taken out of rho' into the field products' alpha."""
        fixed = self.fixed_rates()
        if fixed is not None:
            calls, r, slope, alpha = fixed
            for call in calls:
                call()
            return r, slope, alpha
        n, s, rho = self.n, self.s, self.rhos[1]
        if self.uniform:  # one op chain over the flat buffer for every layer
            r = rho.rho(self.flat)
            return self.views(r), slope_of(rho, r, self.flat), 1.0
        r = [None, *(s[k] if self.plain[k] else self.rhos[k].rho(s[k]) for k in range(1, n + 1))]
        slopes = [None, *(None if self.plain[k] else slope_of(self.rhos[k], r[k], s[k]) for k in range(1, n + 1))]
        return r, slopes, 1.0

    def fixed_rates(self) -> tuple[list, list, Tensor | None, float] | None:
        """(calls, r, slope, alpha) when the rates live in fixed tensors: the state itself (every layer plain), or
        buffers made once that ``calls`` fill (uniform logistic or tanh rates, 2-4 ops, no allocation); None when
        they are new tensors at every evaluation (then :meth:`rates` computes them)."""
        if all(self.plain[1:]):
            return [], self.s, None, 1.0
        rho = self.rhos[1]
        if not self.uniform or type(rho) not in (Sigmoid, Tanh):
            return None
        if self.rbuf is None:
            self.rbuf, self.pbuf = self.buffer("rates"), self.buffer("slopes")
            self.r = self.views(self.rbuf)
        calls, alpha = smooth_rate_calls(rho, self.flat, self.rbuf, self.pbuf, self.scalar)
        return calls, self.r, self.pbuf, alpha

    def field_calls(self, r: list, k: int, out: Tensor, static: Tensor | None = None, alpha: float = 1.0,
                    products_only: bool = False) -> list:
        """h_k = b_k + W_k rho(s_{k-1}) + W_{k+1}^T rho(s_{k+1}) into ``out`` (``static`` holds b_k and x's drive;
        with ``alpha`` the products are scaled, and ``static`` must be too), as calls bound to their tensors, to
        run now or to replay at every step; ``products_only``: without the static part (and alpha 1), by
        :meth:`product`."""
        base = None if products_only else self.static[k] if static is None else static
        calls = self.product(r[k - 1], k, True, out, base, alpha) if k > 1 else []
        if k < self.n:
            calls += self.product(r[k + 1], k + 1, False, out, base if k == 1 else None, alpha, accumulate=k > 1)
        if calls:
            return calls
        return [out.zero_] if products_only else [partial(out.copy_, base)]

    def replayable(self, plans: list) -> bool:
        """Whether a step can be replayed as fixed calls: every layer plain (rho(s) = s, rho'(s) = 1) and kept
        so by the projections in ``plans`` (a hard-sigmoid layer stays plain only while it is clipped)."""
        if not all(self.plain[1:]):
            return False
        clipped = {k for plan in plans for lo, hi, _, _ in plan for k in range(1, self.n + 1)
                   if lo <= self.span[k][0] < hi}
        return all(k in clipped for k in range(1, self.n + 1) if self.hard[k])

    def clamp_plan(self, layers) -> list[tuple[int, int, tuple[float, float], Tensor]]:
        """(start, stop, bounds, slice of the state buffer) runs of the flat layout that project ``layers``: one
        run when they are contiguous and share their interval (all hard-sigmoid layers), else one per layer."""
        runs = sorted((*self.span[k], self.bounds[k]) for k in layers if self.bounds[k] is not None)
        merged: list = []
        for lo, hi, b in runs:
            if merged and merged[-1][1] == lo and merged[-1][2] == b:
                merged[-1] = (merged[-1][0], hi, b)
            else:
                merged.append((lo, hi, b))
        return [(lo, hi, b, self.flat if lo == 0 and hi == self.flat.numel() else self.flat[lo:hi])
                for lo, hi, b in merged]

    def clamp(self, flat: Tensor, plan: list, layers) -> None:
        """Project ``flat`` (laid out like the state) by ``plan``; mark the hard-sigmoid layers plain."""
        for lo, hi, b, run in plan:  # run: the state buffer's own slice, made once (a slice is an op too)
            (run if flat is self.flat else flat if lo == 0 and hi == flat.numel() else flat[lo:hi]).clamp_(*b)
        # after clip(s, 0, 1), rho(s) = s and rho'(s) = 1 (closed interval); without it the step may leave [0, 1]
        for k in layers:
            if self.hard[k]:
                self.plain[k] = bool(plan)

    def finite(self) -> bool:
        return all_finite(self.flat)

    def euler_stepper(self, eps: float, nudge, nudge_factor: float, project: bool) -> Callable:
        """``advance(measure, commit=True, count=1)``: ``count`` leaky-integrator steps (BF-1 with the nudge of BF-9),
        in the compiled kernels (:mod:`earlyprop.native`) or the torch loops (:func:`chain_loops.euler_loop`)."""
        if self.native is not None:
            return self.native.euler_stepper(eps, nudge, nudge_factor, project)
        return euler_loop(self, eps, nudge, nudge_factor, project)

    def block_stepper(self, groups: list[list[int]], nudge, beta_scale: float, omega: float = 1.0) -> Callable:
        """``advance(measure, count=1)``: ``count`` sweeps of exact block minimisation (SC23), over-relaxed by
        ``omega``, in the compiled kernels or the torch loops (:func:`chain_loops.block_loop`)."""
        # the curvature's host sync (per-example beta) happens here, once per phase
        curvature = nudge_curvature(nudge, beta_scale, self.flat) if nudge is not None else None
        if self.native is not None and (curvature is None or curvature[1]):
            return self.native.block_stepper(nudge, beta_scale, omega, None if curvature is None else curvature[0])
        return block_loop(self, groups, nudge, beta_scale, omega, curvature)
