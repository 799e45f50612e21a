"""The Python side of the compiled kernels of :mod:`earlyprop.native`: a chain's buffers and layout seen as numpy
arrays (:class:`KernelLayout`, made once per layout; :class:`NativeChain`, per phase), and the steppers that
:class:`earlyprop.chain.Chain` runs its phases with."""

from __future__ import annotations

import numpy as np
import torch

from earlyprop.native import KINDS, LINEAR, _params, block_sweeps, euler_steps


class KernelLayout:
    """The kernels' arrays that depend on the chain's layout alone (kept with it:
    :class:`earlyprop.chain_layout.ChainLayout`): ``layout``, ``params`` and the free-free weights, as numpy views of
    the parameters (so an in-place update reaches them)."""

    def __init__(self, chain, batch: int):
        n, sizes, rhos = chain.n, chain.sizes, chain.rhos
        np_dtype = torch.empty(0, dtype=chain.dtype).numpy().dtype
        self.layout = np.array([[0, *(chain.span[k][0] for k in range(1, n + 1))], sizes,
                                [KINDS[type(rho)] if k else LINEAR for k, rho in enumerate(rhos)]], dtype=np.int64)
        self.params = np.array([_params(rho) for rho in rhos], dtype=np_dtype).T.copy()
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
