"""Rate nonlinearities rho(s) with their first two derivatives (THEORY §1.1, §4 A5).

Every nonlinearity exposes ``rho``, ``rho_prime`` and ``rho_second`` so that the drive
R(s) (BF-5), the Jacobian (BF-8) and Newton polishing can all be written in closed form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TensorFn = Callable[[Tensor], Tensor]


class Nonlinearity:
    """A rate function rho with rho' and rho''.

    Subclass and override the three methods, or build one from callables with
    :meth:`from_callables`. ``bounds`` is the interval that the state may be projected
    onto (EP17 eq. 43); ``None`` means unbounded.
    """

    name: str = "custom"
    bounds: tuple[float, float] | None = None

    def rho(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    def rho_prime(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    def rho_second(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, s: Tensor) -> Tensor:
        return self.rho(s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @staticmethod
    def from_callables(
        rho: TensorFn,
        rho_prime: TensorFn,
        rho_second: TensorFn | None = None,
        name: str = "custom",
    ) -> Nonlinearity:
        """Wrap user functions; rho'' defaults to zero (piecewise-linear rho)."""
        return _Custom(rho, rho_prime, rho_second or torch.zeros_like, name)


class _Custom(Nonlinearity):
    def __init__(self, rho: TensorFn, rho_prime: TensorFn, rho_second: TensorFn, name: str):
        self._fns = (rho, rho_prime, rho_second)
        self.name = name

    def rho(self, s: Tensor) -> Tensor:
        return self._fns[0](s)

    def rho_prime(self, s: Tensor) -> Tensor:
        return self._fns[1](s)

    def rho_second(self, s: Tensor) -> Tensor:
        return self._fns[2](s)

    def __repr__(self) -> str:
        return f"Nonlinearity.from_callables(name={self.name!r})"


class HardSigmoid(Nonlinearity):
    """rho(s) = clip(s, 0, 1) (EP17 §5.1.1); rho' = 1 on the closed interval [0, 1] (THEORY A5)."""

    name = "hard_sigmoid"
    bounds = (0.0, 1.0)

    def rho(self, s: Tensor) -> Tensor:
        return s.clamp(0.0, 1.0)

    def rho_prime(self, s: Tensor) -> Tensor:
        return ((s >= 0.0) & (s <= 1.0)).to(s.dtype)

    def rho_second(self, s: Tensor) -> Tensor:
        return torch.zeros_like(s)


class Sigmoid(Nonlinearity):
    """Logistic rho(s) = 1 / (1 + exp(-gain (s - shift))); ER19 uses gain 4, shift 0.5."""

    name = "sigmoid"

    def __init__(self, gain: float = 1.0, shift: float = 0.0):
        self.gain = gain
        self.shift = shift

    def rho(self, s: Tensor) -> Tensor:
        return torch.sigmoid(self.gain * (s - self.shift))

    def rho_prime(self, s: Tensor) -> Tensor:
        r = self.rho(s)
        return self.gain * r * (1.0 - r)

    def rho_second(self, s: Tensor) -> Tensor:
        r = self.rho(s)
        return self.gain**2 * r * (1.0 - r) * (1.0 - 2.0 * r)

    def __repr__(self) -> str:
        return f"Sigmoid(gain={self.gain}, shift={self.shift})"


class Tanh(Nonlinearity):
    """rho(s) = tanh(s), the smooth rho used by the theory checks (THEORY §2)."""

    name = "tanh"

    def rho(self, s: Tensor) -> Tensor:
        return torch.tanh(s)

    def rho_prime(self, s: Tensor) -> Tensor:
        return 1.0 - torch.tanh(s) ** 2

    def rho_second(self, s: Tensor) -> Tensor:
        t = torch.tanh(s)
        return -2.0 * t * (1.0 - t**2)


class Linear(Nonlinearity):
    """rho(s) = s: a linear unit, e.g. the linear output of ER19-EB and SC23 (THEORY A8)."""

    name = "linear"

    def rho(self, s: Tensor) -> Tensor:
        return s

    def rho_prime(self, s: Tensor) -> Tensor:
        return torch.ones_like(s)

    def rho_second(self, s: Tensor) -> Tensor:
        return torch.zeros_like(s)


_REGISTRY: dict[str, Callable[[], Nonlinearity]] = {
    "hard_sigmoid": HardSigmoid,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "linear": Linear,
}

NONLINEARITIES = tuple(_REGISTRY)


def get_nonlinearity(spec: str | Nonlinearity) -> Nonlinearity:
    """Return a nonlinearity from its name (``hard_sigmoid``, ``sigmoid``, ``tanh``, ``linear``)."""
    if isinstance(spec, Nonlinearity):
        return spec
    key = spec.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown nonlinearity {spec!r}; choose one of {', '.join(NONLINEARITIES)}")
    return _REGISTRY[key]()
