"""Costs C(y, d) on the driven layer and the nudge they exert (THEORY §1.8, BF-9, A9).

A cost returns its value per example and its gradient with respect to the driven layer's
state; the relaxation loop subtracts ``beta * dC/dy`` from that layer's velocity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Cost:
    """Interface: ``value(y, target) -> (batch,)`` and ``grad(y, target) -> like y``."""

    name = "cost"

    def value(self, y: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def grad(self, y: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, y: Tensor, field: Tensor | None = None) -> Tensor:
        """Class prediction from the driven layer (EP17 eq. 40: argmax, no softmax).

        ``field``: the driven layer's input h = b + W rho(s_prev) at the same state. A bounded rate
        projected onto its box ties at the bound (several units at exactly 1, or all at 0), and a
        bare argmax would then answer the lowest index; among the units at the maximum the one with
        the largest field wins instead. Without ties the answer is argmax(y) as before.
        """
        if field is None:
            return y.argmax(-1)
        top = y == y.max(-1, keepdim=True).values
        return torch.where(top, field.to(y.dtype), torch.full_like(y, -torch.inf)).argmax(-1)

    def encode(self, labels: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
        """Integer labels to the target the cost expects (one-hot for squared error)."""
        return F.one_hot(labels, n_classes).to(dtype)


class SquaredError(Cost):
    """C = 1/2 ||y - d||^2 (THEORY A9: with the 1/2), dC/dy = y - d."""

    name = "squared_error"

    def value(self, y: Tensor, target: Tensor) -> Tensor:
        return 0.5 * ((y - target) ** 2).sum(-1)

    def grad(self, y: Tensor, target: Tensor) -> Tensor:
        return y - target


class CrossEntropyReadout(Cost, nn.Module):
    """C = CE(softmax(W_out rho(y)), d) with a readout that is not part of the dynamics (LA21).

    ``readout`` maps the driven layer's rates to logits; its own weights get the direct
    gradient dC/dW_out (they sit outside the energy).
    """

    name = "cross_entropy"

    def __init__(self, n_in: int, n_classes: int, rho=None):
        nn.Module.__init__(self)
        self.readout = nn.Linear(n_in, n_classes)
        self.rho = rho

    def logits(self, y: Tensor) -> Tensor:
        return self.readout(self.rho.rho(y) if self.rho is not None else y)

    def value(self, y: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(y), target, reduction="none")

    def grad(self, y: Tensor, target: Tensor) -> Tensor:
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.value(y_, target).sum(), y_)
        return g

    def predict(self, y: Tensor, field: Tensor | None = None) -> Tensor:
        return self.logits(y).argmax(-1)  # the logits are unbounded: no ties to break

    def encode(self, labels: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
        return labels

