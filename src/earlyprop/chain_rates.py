"""The rates of a lean chain's smooth layers (:class:`earlyprop.chain.Chain`): rho(s) and rho'(s) as bound calls into
buffers made once (replayed at every step), or as new tensors.

The checks are on the exact type: a subclass of ``Sigmoid`` or ``Tanh`` may change the formula, and then gets its
own ``rho`` / ``rho_prime`` (the general formulas), never the parent's shortcut.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from earlyprop.nonlinearity import Sigmoid, Tanh


def smooth_rate_calls(rho, s: Tensor, r: Tensor, slope: Tensor, scalar) -> tuple[list, float]:
    """The calls that put r = rho(s) and rho'(s) / factor into ``r`` and ``slope``, and the factor (the logistic
    gain, which the fields then carry as addmm's alpha: one op fewer per step). Same formulas as the classes'
    methods, in another order: equal up to round-off. ``scalar`` makes 0-d tensors: a Python float operand
    costs an extra ~3 us per op (it is wrapped into a tensor on every call)."""
    if type(rho) is Sigmoid:  # sigmoid(g s - g shift), and g r (1 - r) = g (r - r^2)
        return [partial(torch.add, scalar(-rho.gain * rho.shift), s, alpha=rho.gain, out=r), r.sigmoid_,
                partial(torch.addcmul, r, r, r, value=-1.0, out=slope)], rho.gain
    slope_call = partial(torch.addcmul, scalar(1.0), r, r, value=-1.0, out=slope)  # 1 - r^2
    if s.device.type != "cpu":
        return [partial(torch.tanh, s, out=r), slope_call], 1.0
    # tanh(s) = 2 sigmoid(2 s) - 1: torch's CPU tanh costs ~3 sigmoids, and this is as exact in absolute terms
    # (within 1.5 ulp of 1: 3.3e-16 in float64, 1.8e-7 in float32; tests/speed/test_fast_paths.py)
    double, unshift = partial(torch.mul, s, scalar(2.0), out=r), partial(torch.add, scalar(-1.0), r, alpha=2.0, out=r)
    return [double, r.sigmoid_, unshift, slope_call], 1.0


def slope_of(rho, r: Tensor, s: Tensor) -> Tensor:
    """rho'(s) given r = rho(s): the smooth rates' formulas reuse r (as their own rho_prime computes it)."""
    if type(rho) is Sigmoid:
        return rho.gain * r * (1.0 - r)
    if type(rho) is Tanh:
        return 1.0 - r**2
    return rho.rho_prime(s)
