"""The Python side of the compiled kernels of :mod:`earlyprop.native`: a chain's buffers and layout seen as numpy
arrays (:class:`KernelLayout`, made once per layout; :class:`NativeChain`, per phase), and the steppers that
:class:`earlyprop.chain.Chain` runs its phases with; whether the kernels can run a chain at all (:func:`fits`)."""

from __future__ import annotations

import numpy as np
import torch

from earlyprop import native
from earlyprop.native import HARD, LINEAR, SIGMOID, TANH, block_sweeps, euler_steps
from earlyprop.nonlinearity import HardSigmoid, Linear, Sigmoid, Tanh

# A step's products stay in the kernel while they take at most this many multiply-adds (batch x the free-free
# couplings of one example), divided by torch's threads (the kernel runs on one, MKL's products on all):
# past it MKL's blocked products win. Per Euler step, float32, one thread, torch loop over kernel in two runs
# (BENCHMARKS.md, "2026-11-28: compiled kernels"): batch 20: 784-500-10 (100K MACs) 1.65x, 2.02x;
# 784-100-100-10 (220K) 1.39x, 1.23x; 784-200-200-10 (840K) 1.12x, 0.98x; 784-300-300-10 (1.9M) 0.84x, 0.75x;
# and (one run) 784-500-10 at batch 64 (320K) 1.10x, at batch 256 (1.3M) 0.89x.
MAX_STEP_MACS = 800_000
KINDS = {Linear: LINEAR, HardSigmoid: HARD, Sigmoid: SIGMOID, Tanh: TANH}


class KernelLayout:
    """The kernels' arrays that depend on the chain's layout alone (kept with it:
    :class:`earlyprop.chain_layout.ChainLayout`): ``layout``, ``params`` and the free-free weights, as numpy views of
    the parameters (so an in-place update reaches them)."""

    def __init__(self, chain, batch: int):
        n, sizes, rhos = chain.n, chain.sizes, chain.rhos
        np_dtype = torch.empty(0, dtype=chain.dtype).numpy().dtype
        self.layout = np.array([[0, *(chain.span[k][0] for k in range(1, n + 1))], sizes,
                                [KINDS[type(rho)] if k else LINEAR for k, rho in enumerate(rhos)]], dtype=np.int64)
        self.params = np.array([rate_params(rho) for rho in rhos], dtype=np_dtype).T.copy()
        # views where contiguous (ChainLayout.of memoizes only then), so an in-place update reaches the kernels
        self.weights = tuple(w.detach().contiguous().numpy() for w in chain.w[2:])
        self.rows_shape = (4, max(sizes[1:]))


class NativeChain:
    """The compiled steppers of a :class:`earlyprop.chain.Chain` (its buffers, seen as numpy arrays)."""

    def __init__(self, chain, kernels: KernelLayout):
        n = chain.n
        self.s = chain.flat.numpy()
        self.dtype = chain.flat.dtype
        self.r, self.slope = np.empty_like(self.s), np.empty_like(self.s)
        self.rows = np.empty(kernels.rows_shape, dtype=self.s.dtype)
        self.layout, self.params, self.weights = kernels.layout, kernels.params, kernels.weights
        self.statics = tuple(chain.static[k].detach().numpy() for k in range(1, n + 1))  # contiguous (Chain)
        self.driven = chain.s[n]

    def scalar(self, value: float):
        return self.s.dtype.type(value)

    def per_example(self, value) -> np.ndarray:
        """A (batch,) array of a scalar or a per-example (batch,) / (batch, 1) tensor, in the state's dtype."""
        out = np.empty(self.driven.shape[0], dtype=self.s.dtype)  # C-contiguous and writable: one kernel signature
        out[:] = value.detach().reshape(-1).numpy() if isinstance(value, torch.Tensor) else value
        return out

    def pull(self, nudge, scale: float) -> np.ndarray:
        """scale beta d on the driven layer (per example for a per-example beta), flat, in the state's dtype."""
        beta = nudge.beta
        factor = scale * (beta.detach().reshape(-1, 1).numpy() if isinstance(beta, torch.Tensor) else float(beta))
        out = np.empty(self.driven.shape, dtype=self.s.dtype)  # numpy's small ops: ~1 us, torch's ~4
        np.multiply(nudge.target.detach().numpy(), factor, out=out)  # broadcast into out: np.broadcast_to costs 6
        return out.reshape(-1)

    def euler_stepper(self, eps: float, nudge, nudge_factor: float, project: bool):
        """``advance(measure, commit=True, count=1)`` of :meth:`Chain.euler_stepper`, compiled."""
        pull = kpull = np.zeros(1, dtype=self.s.dtype)  # unread without a nudge
        if nudge is not None:  # k = c beta / eps, the nudge k (d - s) of chain.Chain.euler_stepper
            pull, kpull = self.pull(nudge, nudge_factor / eps), self.per_example(nudge_factor * nudge.beta / eps)
        eps_d = self.scalar(eps)

        def advance(measure: bool, commit: bool = True, count: int = 1) -> float | None:
            worst = euler_steps(self.s, self.r, self.slope, self.rows, self.statics, pull, kpull,
                                self.layout, self.params, self.weights, eps_d, count, measure, commit, project,
                                nudge is not None)
            return worst if measure else None

        return advance

    def block_stepper(self, nudge, beta_scale: float, omega: float, curvature):
        """``advance(measure, count=1)`` of :meth:`Chain.block_stepper` for a convex nudge, compiled."""
        pull = a = np.zeros(1, dtype=self.s.dtype)  # unread without a nudge
        if nudge is not None:
            pull, a = self.pull(nudge, beta_scale), self.per_example(curvature)
        omega_d = self.scalar(omega)

        def advance(measure: bool, count: int = 1) -> float | None:
            worst = block_sweeps(self.s, self.r, self.slope, self.rows, self.statics, pull, a, self.layout,
                                 self.params, self.weights, omega_d, count, measure, nudge is not None)
            return worst if measure else None

        return advance


def fits(rhos, sizes, weights, batch: int) -> bool:
    """Whether the kernels can run the chain x - h_1 - ... - h_n (rates ``rhos[1:]``, free-free couplings
    ``weights[1:]``) on a batch: numba installed, CPU float32/float64, two free layers or more, linear,
    hard-sigmoid, logistic or tanh rates, and products small enough (:data:`MAX_STEP_MACS`)."""
    n, w = len(sizes) - 1, weights[0]
    if native.numba is None or n < 2 or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
        return False
    if any(type(rho) not in KINDS for rho in rhos[1:]):
        return False
    step_macs = batch * sum(sizes[k] * sizes[k - 1] for k in range(2, n + 1))
    return step_macs <= MAX_STEP_MACS / torch.get_num_threads()


def rate_params(rho) -> tuple[float, float, float, float]:
    """(lo, hi, gain, shift) of a rate: its bounds (+-inf when unbounded), and the logistic's gain and shift."""
    lo, hi = rho.bounds or (-np.inf, np.inf)
    return lo, hi, getattr(rho, "gain", 1.0), getattr(rho, "shift", 0.0)
