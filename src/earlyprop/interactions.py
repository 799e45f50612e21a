"""Interaction terms of the energy (THEORY §1.4, BF-4).

Each term couples the rates of one or two layers and knows three things about itself:
its energy, the field it sends to each layer it touches (minus the derivative of its energy
with respect to that layer's rate), and the derivative of the batch-mean energy with respect
to its own parameters. One weight tensor per term, so W_ij = W_ji holds by construction.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor, nn


class Interaction(nn.Module):
    """Base class: a term of the energy that touches ``layers`` (layer indices)."""

    layers: tuple[int, ...]

    def energy(self, rates: list[Tensor]) -> Tensor:
        """Energy contribution per example, shape (batch,)."""
        raise NotImplementedError

    def fields(self, rates: list[Tensor], targets: Collection[int] | None = None) -> dict[int, Tensor]:
        """-dE_term/d rho(s_l) for each touched layer l (only those in ``targets`` when given)."""
        raise NotImplementedError

    def param_grads(self, rates: list[Tensor], weights: Tensor | None = None) -> list[Tensor]:
        """d(mean over the batch of w_b * E_term)/d theta, aligned with ``self.parameters()``.

        ``weights`` (batch,) defaults to ones; EP estimators use 1/beta_b per example.
        """
        raise NotImplementedError


class Coupling(Interaction):
    """A term between two layers, ``pre`` (farther from the output) and ``post``, through one ``weight``.

    ``feedforward(rho_pre)`` is the field it sends to ``post``: the feed-forward pass of the matching
    network (the backprop baseline, ``rules.reference.Backprop``) uses it.
    """

    pre: int
    post: int
    weight: nn.Parameter

    def feedforward(self, r_pre: Tensor) -> Tensor:
        raise NotImplementedError


class Dense(Coupling):
    """E = -rho(s_post)^T W rho(s_pre), W of shape (n_post, n_pre) (layered BF-4).

    Two layers interact through one matrix, so the feedback path uses W^T exactly
    (BF-8: J_{l-1,l} = J_{l,l-1}^T).
    """

    def __init__(self, pre: int, post: int, n_pre: int, n_post: int, weight: Tensor | None = None):
        super().__init__()
        if pre == post:
            raise ValueError("Dense couples two different layers; use Lateral for within-layer weights")
        self.pre, self.post = pre, post
        self.layers = (pre, post)
        if weight is None:
            weight = torch.zeros(n_post, n_pre)
        if tuple(weight.shape) != (n_post, n_pre):
            raise ValueError(
                f"weight of interaction {pre}->{post} has shape {tuple(weight.shape)}, expected {(n_post, n_pre)}"
            )
        self.weight = nn.Parameter(weight.clone())

    def feedforward(self, r_pre: Tensor) -> Tensor:
        return r_pre @ self.weight.T

    def energy(self, rates: list[Tensor]) -> Tensor:
        return -((rates[self.pre] @ self.weight.T) * rates[self.post]).sum(-1)

    def fields(self, rates: list[Tensor], targets: Collection[int] | None = None) -> dict[int, Tensor]:
        out = {}
        if targets is None or self.post in targets:
            out[self.post] = rates[self.pre] @ self.weight.T
        if targets is None or self.pre in targets:
            out[self.pre] = rates[self.post] @ self.weight
        return out

    def param_grads(self, rates: list[Tensor], weights: Tensor | None = None) -> list[Tensor]:
        r_post, r_pre = _weighted(rates[self.post], weights), rates[self.pre]
        return [-(r_post.T @ r_pre) / r_pre.shape[0]]

    def extra_repr(self) -> str:
        return f"pre={self.pre}, post={self.post}, shape={tuple(self.weight.shape)}"


class Lateral(Interaction):
    """E = -1/2 sum_{i != j} L_ij rho(s_i) rho(s_j) within one layer; L symmetric, zero diagonal.

    The parameter holds the full symmetric matrix; its gradient is symmetric with a zero
    diagonal, so any element-wise optimizer keeps L symmetric.
    """

    def __init__(self, layer: int, n: int, weight: Tensor | None = None):
        super().__init__()
        self.layer = layer
        self.layers = (layer,)
        if weight is None:
            weight = torch.zeros(n, n)
        check_lateral_matrix(weight, n, layer)
        self.weight = nn.Parameter(weight.clone())
        self.register_buffer("_off_diagonal", 1.0 - torch.eye(n, dtype=weight.dtype), persistent=False)

    def energy(self, rates: list[Tensor]) -> Tensor:
        r = rates[self.layer]
        return -0.5 * ((r @ self.weight) * r).sum(-1)

    def fields(self, rates: list[Tensor], targets: Collection[int] | None = None) -> dict[int, Tensor]:
        if targets is not None and self.layer not in targets:
            return {}
        return {self.layer: rates[self.layer] @ self.weight}

    def param_grads(self, rates: list[Tensor], weights: Tensor | None = None) -> list[Tensor]:
        r = rates[self.layer]
        return [-0.5 * (_weighted(r, weights).T @ r) * self._off_diagonal.to(r.dtype) / r.shape[0]]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, n={self.weight.shape[0]}"


def _weighted(r: Tensor, weights: Tensor | None) -> Tensor:
    return r if weights is None else r * weights[:, None]


def check_lateral_matrix(weight: Tensor, n: int, layer: int) -> None:
    """Raise ValueError unless ``weight`` is an (n, n) symmetric matrix with zero diagonal (THEORY A10)."""
    if tuple(weight.shape) != (n, n):
        raise ValueError(f"lateral matrix of layer {layer} has shape {tuple(weight.shape)}, expected {(n, n)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"lateral matrix of layer {layer} contains NaN or inf")
    scale = float(weight.abs().max()) if weight.numel() else 0.0
    tol = 1e-6 * max(scale, 1.0) if weight.dtype != torch.float64 else 1e-12 * max(scale, 1.0)
    if float((weight - weight.T).abs().max()) > tol:
        raise ValueError(f"lateral matrix of layer {layer} is not symmetric (W must equal W^T)")
    if float(weight.diagonal().abs().max()) > tol:
        raise ValueError(f"lateral matrix of layer {layer} has a non-zero diagonal (self-coupling W_ii must be 0)")


def glorot_uniform(n_out: int, n_in: int, generator: torch.Generator | None = None) -> Tensor:
    """Glorot-uniform initial weights (EP17 §5)."""
    bound = math.sqrt(6.0 / (n_in + n_out))
    return (torch.rand(n_out, n_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def gaussian_fan_in(n_out: int, n_in: int, gain: float, generator: torch.Generator | None = None) -> Tensor:
    """W ~ N(0, gain^2 / n_in), the reference configuration of THEORY §2."""
    return torch.randn(n_out, n_in, generator=generator, dtype=torch.float64) * (gain / math.sqrt(n_in))
