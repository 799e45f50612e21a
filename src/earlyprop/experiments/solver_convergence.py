"""Iterations to a fixed point: the Euler leaky integrator against the block solver, exact and over-relaxed.

Issue 4's solver check: from rest, how many Euler steps (eps 0.5, projected) and how many block sweeps
(``method="async"``, each ``omega``) until the projected residual max|clip(s + eps F) - s| / eps is at most
``tol``. Every solver is scored by that same Euler residual, one sweep at a time, so the counts compare like
with like; one sweep costs about one Euler step. The energy of a deep layered net can have several minima,
so each solver's fixed point is compared with Euler's (largest state difference, mean energies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyprop.dynamics import relax
from earlyprop.network import Network, State


@dataclass
class SolverCount:
    """One solver on one batch: iterations to ``tol``, the ratio to Euler's, and where it settled."""

    name: str
    iterations: int
    converged: bool
    ratio: float
    max_state_difference: float
    mean_energy: float


def count_iterations(network: Network, x: Tensor, omegas: Sequence[float] = (1.0, 1.3, 1.5, 1.7),
                     tol: float = 1e-4, eps: float = 0.5, limit: int = 20000) -> list[SolverCount]:
    """Euler first (the reference), then the block solver at each ``omega``, from ``network.init_state(x)``."""
    euler, diag = relax(network, network.init_state(x), steps=limit, eps=eps, project=True, tol=tol, check_every=1)
    rows = [_row("euler", diag.steps, diag.converged, diag.steps, euler, euler, network)]
    for omega in omegas:
        state, sweeps, converged = network.init_state(x), 0, False
        while sweeps < limit and not converged:
            state, _ = relax(network, state, steps=1, eps=eps, method="async", omega=omega)
            sweeps += 1
            _, check = relax(network, state, steps=0, eps=eps, project=True)  # steps=0: the residual only
            converged = check.residual <= tol
        rows.append(_row(f"async omega={omega:g}", sweeps, converged, diag.steps, state, euler, network))
    return rows


def _row(name: str, iterations: int, converged: bool, euler_steps: int, state: State, euler: State,
         network: Network) -> SolverCount:
    with torch.no_grad():
        difference = max(float((a - b).abs().max()) for a, b in zip(state[1:], euler[1:]))
        energy = float(network.energy(state).mean())
    return SolverCount(name, iterations, converged, iterations / max(euler_steps, 1), difference, energy)


def format_counts(title: str, rows: list[SolverCount], same: float = 1e-2) -> str:
    """One table line per solver; ``*`` marks a fixed point other than Euler's (a state difference > ``same``)."""
    lines = [title]
    for r in rows:
        mark = "" if r.max_state_difference <= same else " *"
        flag = "" if r.converged else " (not converged)"
        lines.append(f"  {r.name:<18} {r.iterations:>6}{flag}  ratio {r.ratio:.3f}  max |s - s_euler| "
                     f"{r.max_state_difference:.1e}  mean E {r.mean_energy:.4f}{mark}")
    return "\n".join(lines)
