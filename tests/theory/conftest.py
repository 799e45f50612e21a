"""Shared setup of the float64 theory checks: THEORY §2's reference configuration (RC) and autograd helpers.

RC: sizes [5, 6, 5, 4, 3], rho = tanh, W ~ N(0, 0.6^2 / fan_in), b ~ N(0, 0.1^2), x ~ N(0, 1),
d ~ U(-0.5, 0.5), float64, free fixed point by Euler (eps 0.2) then Newton. The weights come from
``Network.layered(seed=0)`` (a torch generator) and the data from ``numpy.random.default_rng(0)``, so the
draws differ from THEORY's own script: observed values are comparable, not identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor

from earlyprop import Network
from earlyprop.dynamics import internal_force
from earlyprop.experiments.early_inference import free_fixed_point, layer_distances, layered_deltas

RC_SIZES = (5, 6, 5, 4, 3)
RC_BATCH = 4
UNIT_ROUNDOFF = 2.0**-53


@dataclass
class Reference:
    """A network with its data, free fixed point s*, layered deltas (ref A) and layer distances."""

    net: Network
    x: Tensor
    d: Tensor
    state: list[Tensor]
    residual: float
    deltas: dict[int, Tensor]
    dist: dict[int, int]


def rc_network(rho: str = "tanh", **kwargs) -> Network:
    options = dict(init="gaussian", gain=0.6, bias_std=0.1, seed=0, dtype=torch.float64)
    options.update(kwargs)
    return Network.layered(RC_SIZES, rho, **options)


def rc_data(batch: int = RC_BATCH, seed: int = 0, n_in: int = RC_SIZES[0], n_out: int = RC_SIZES[-1]):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((batch, n_in)))
    d = torch.tensor(rng.uniform(-0.5, 0.5, (batch, n_out)))
    return x, d


def build_reference(net: Network, x: Tensor, d: Tensor) -> Reference:
    """Fixed point as in THEORY §2 (Euler at eps 0.2, then Newton), ref-A deltas and distances."""
    state, residual = free_fixed_point(net, x, eps=0.2, steps=3000)
    state = [s.detach() for s in state]
    return Reference(net, x, d, state, residual, layered_deltas(net, state, d), layer_distances(net))


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Every tensor here is tiny; on a shared 2-core machine intra-op threads only add contention
    # (measured: the Langevin check runs ~20x slower with 2 threads while other jobs run).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def rc() -> Reference:
    """THEORY's reference configuration; tests must not modify it (copy the network first)."""
    x, d = rc_data()
    return build_reference(rc_network(), x, d)


# ------------------------------------------------------------------------------------------- helpers
def flat_free(net: Network, state: Sequence[Tensor]) -> Tensor:
    """The free layers side by side, shape (batch, n_free)."""
    return torch.cat([state[m] for m in net.free], dim=-1)


def with_free(net: Network, state: Sequence[Tensor], flat: Tensor) -> list[Tensor]:
    """``state`` with its free layers replaced by the columns of ``flat``."""
    out, offset = list(state), 0
    for m in net.free:
        out[m] = flat[:, offset:offset + net.sizes[m]]
        offset += net.sizes[m]
    return out


def random_free_state(net: Network, x: Tensor, seed: int = 1) -> list[Tensor]:
    """x clamped, every free layer ~ N(0, 1) (THEORY T1 setup)."""
    gen = torch.Generator().manual_seed(seed)
    state = net.init_state(x)
    for m in net.free:
        state[m] = torch.randn(state[m].shape, generator=gen, dtype=torch.float64)
    return state


def force_of_free(net: Network, state: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """flat free state -> R(s) - s over the free layers (the loop's internal force), flattened."""

    def force(flat: Tensor) -> Tensor:
        f = internal_force(net, with_free(net, state, flat))
        return torch.cat([f[m] for m in net.free], dim=-1)

    return force


def fd_energy_gradient(net: Network, state: Sequence[Tensor], h: float = 1e-6) -> Tensor:
    """dE/ds of the free state by central finite differences of the energy."""
    flat = flat_free(net, state)
    fd = torch.empty_like(flat)
    with torch.no_grad():
        for i in range(flat.shape[1]):
            up, down = flat.clone(), flat.clone()
            up[:, i] += h
            down[:, i] -= h
            fd[:, i] = (net.energy(with_free(net, state, up)) - net.energy(with_free(net, state, down))) / (2 * h)
    return fd


def jacobian_asymmetry(net: Network, state: Sequence[Tensor]) -> Tensor:
    """||J - J^T|| / ||J|| per example for J = dR/ds over the free layers (T2)."""
    force = force_of_free(net, state)
    jac = batched_jacobian(lambda f: force(f) + f, flat_free(net, state))
    return (jac - jac.transpose(1, 2)).flatten(1).norm(dim=-1) / jac.flatten(1).norm(dim=-1)


def autograd_energy_gradient(net: Network, state: Sequence[Tensor]) -> Tensor:
    """dE/ds of the free state by autograd of the energy (independent of the closed-form drive)."""
    flat = flat_free(net, state).detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(net.energy(with_free(net, state, flat)).sum(), flat)
    return grad


def batched_jacobian(fn: Callable[[Tensor], Tensor], flat: Tensor) -> Tensor:
    """Per-example Jacobian d fn(flat)[b, i] / d flat[b, j], shape (batch, n, n); examples are independent."""
    flat = flat.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(flat)
        rows = [torch.autograd.grad(out[:, i].sum(), flat, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, dim=1)


def energy_hessian(net: Network, state: Sequence[Tensor]) -> Tensor:
    """H = d^2E/ds^2 per example by double autograd of the energy, shape (batch, n_free, n_free)."""

    def grad_fn(flat: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(net.energy(with_free(net, state, flat)).sum(), flat, create_graph=True)
        return g

    return batched_jacobian(grad_fn, flat_free(net, state))


def cost_gradient(net: Network, state: Sequence[Tensor], d: Tensor) -> Tensor:
    """g = dC/ds at ``state`` (non-zero only on the driven layer), flattened like the free state."""
    parts = [torch.zeros_like(state[m]) for m in net.free]
    parts[net.free.index(net.driven)] = state[net.driven] - d
    return torch.cat(parts, dim=-1)


def rel_err(a: Tensor, b: Tensor) -> Tensor:
    """||a - b|| / ||b|| over the last axis."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@pytest.fixture(scope="session")
def th():
    """The helpers above as one namespace, so that test modules need not import conftest by name."""
    return SimpleNamespace(
        rc_network=rc_network, rc_data=rc_data, build_reference=build_reference, flat_free=flat_free,
        with_free=with_free, autograd_energy_gradient=autograd_energy_gradient, batched_jacobian=batched_jacobian,
        random_free_state=random_free_state, force_of_free=force_of_free, fd_energy_gradient=fd_energy_gradient,
        jacobian_asymmetry=jacobian_asymmetry,
        energy_hessian=energy_hessian, cost_gradient=cost_gradient, rel_err=rel_err, unit_roundoff=UNIT_ROUNDOFF,
    )
