"""Equilibrium propagation estimators and the seed's STDP rule (THEORY §1.10, §3.1, §3.4, §3.5).

Both contrast two nudged phases nu_1 < nu_2 started at the free state s^0 (s^0 itself when nu = 0)::

    EP     g = (dE/dtheta(s^{nu_2}) - dE/dtheta(s^{nu_1})) / (nu_2 - nu_1)         (EP17 eq. 24, SC23)
    STDP   g = -(A(nu_2) - A(nu_1)) / (nu_2 - nu_1),  A(nu) = sum_t  post-change(t) * rho(pre)(t)  (BF-17)

with (nu_1, nu_2) = (0, beta) positive, (-beta, 0) negative, (-beta, beta) centered, and
(0, +-beta per example) random sign (EP17, LA21). A(0) = 0: the free chain does not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from earlyprop import step_plan
from earlyprop.chain import StepFields
from earlyprop.chain_layout import autocast_enabled
from earlyprop.cost import Cost
from earlyprop.interactions import Coupling, Dense, Lateral
from earlyprop.network import Network, State
from earlyprop.rules.base import LearningRule, Relaxation, StepResult, accumulate_grads

VARIANTS = ("positive", "negative", "centered", "random_sign")
STDP_FORMS = ("plain", "xie_seung", "tied")


class _Contrastive(LearningRule):
    """Shared phase logic of the contrastive rules; ``variant`` picks (nu_1, nu_2)."""

    def __init__(self, beta: float, variant: str = "positive", relaxation: Relaxation | None = None,
                 cost: Cost | None = None):
        super().__init__(relaxation, cost)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if not isinstance(beta, int | float) or beta != beta or beta == 0 or abs(beta) == float("inf"):
            raise ValueError(f"beta must be a finite non-zero number for {self.name}, got {beta!r}")
        self.beta = float(beta)
        self.variant = variant

    def nudges(self, batch: int, generator: torch.Generator | None, dtype: torch.dtype, device) -> tuple:
        """(nu_1, nu_2): floats, or per-example tensors for the random-sign variant."""
        b = self.beta
        if self.variant == "positive":
            return 0.0, b
        if self.variant == "negative":
            return -b, 0.0
        if self.variant == "centered":
            return -b, b
        signs = torch.randint(0, 2, (batch,), generator=generator).to(dtype=dtype, device=device) * 2 - 1
        return 0.0, b * signs

    def compute_grads(self, network: Network, x: Tensor, target: Tensor, state: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> StepResult:
        form = self._compiled_form()
        if form is not None:  # the whole step in one compiled call where it applies (earlyprop.step_plan)
            compiled = step_plan.compiled_step(self, network, x, target, state, generator, form=form)
            if compiled is not None:
                return compiled
        if state is None:
            start = network.init_state(x)
        else:  # validated before static_fields touches it, so a bad state still gets relax's ValueError
            network.check_state(state)
            start = state
        with torch.no_grad():  # bias + input drive: x stays clamped, so every phase of this batch shares it
            static = StepFields(network.static_fields(start))
        free, diagnostics = self.relaxation.free(network, start, static=static, internal=True)
        nu1, nu2 = self.nudges(x.shape[0], generator, network.dtype, network.device)
        phases = self._phases(network, free, nu1, nu2, target, static)
        # the estimate is a small difference of two phases: never in reduced precision, even under --amp
        with torch.autocast(network.device.type, enabled=False) if autocast_enabled(network.device.type) \
                else nullcontext():
            grads, owned = self._grads(network, phases[0], phases[1], 1.0 / (nu2 - nu1), x.shape[0])
        accumulate_grads(list(network.parameters()), grads, owned=owned)
        value = self._readout_grads(free, target, network)
        return StepResult(free, value, self.predict_state(network, free, static), diagnostics.steps)

    def _compiled_form(self) -> str | None:
        """The estimate ``step_plan.compiled_step`` computes for this rule ("ep" or an STDP form), or None: the
        general path only."""
        return None

    def _phases(self, network: Network, free: State, nu1, nu2, target: Tensor, static: list) -> list:
        return [self._phase(network, free, nu, target, static) for nu in (nu1, nu2)]

    def _grads(self, network: Network, phase_1, phase_2, weights: float | Tensor,
               batch: int) -> tuple[list[Tensor], bool]:
        """The estimate, and whether its tensors are fresh (then adopted as .grad without a copy)."""
        if not isinstance(weights, Tensor):
            weights = torch.full((batch,), weights, dtype=network.dtype, device=network.device)
        return self.estimate(network, phase_1, phase_2, weights), False

    def _phase(self, network: Network, free: State, nu, target: Tensor, static: list | None = None):
        raise NotImplementedError

    def estimate(self, network: Network, phase_1, phase_2, weights: Tensor) -> list[Tensor]:
        raise NotImplementedError


def _is_zero(nu) -> bool:
    return not isinstance(nu, Tensor) and nu == 0.0


class EquilibriumProp(_Contrastive):
    """The EP gradient estimator (EP17 Thm 1; LA21 symmetric; SC23 P/N/C-EP)."""

    name = "ep"

    def _compiled_form(self) -> str | None:
        return "ep" if type(self) is EquilibriumProp else None  # a subclass may change a phase or the estimate

    def _phase(self, network: Network, free: State, nu, target: Tensor, static: list | None = None) -> State:
        if _is_zero(nu):
            return free
        nudged, _ = self.relaxation.nudged(network, free, nu, target, self.cost, static=static, internal=True)
        return nudged

    def _phases(self, network: Network, free: State, nu1, nu2, target: Tensor, static: list) -> list:
        batch = free[0].shape[0]
        if (_is_zero(nu1) or _is_zero(nu2) or isinstance(nu1, Tensor) or isinstance(nu2, Tensor)
                or type(self)._phase is not EquilibriumProp._phase or target.dim() == 0 or target.shape[0] != batch):
            return super()._phases(network, free, nu1, nu2, target, static)
        # centered: both nudged phases start at the free state and rows never interact, so they run as one
        # relaxation of the stacked batch with a per-example beta: half the steps' fixed per-op cost
        twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        beta = torch.cat([torch.full((batch,), nu, dtype=network.dtype, device=network.device) for nu in (nu1, nu2)])
        both, _ = self.relaxation.nudged(network, [twice(t) for t in free], beta, twice(target), self.cost,
                                         static=StepFields([twice(t) for t in static], getattr(static, "packs", None)),
                                         internal=True)
        return [[t[:batch] for t in both], [t[batch:] for t in both]]

    def _grads(self, network: Network, phase_1, phase_2, weights: float | Tensor,
               batch: int) -> tuple[list[Tensor], bool]:
        if type(self).estimate is not EquilibriumProp.estimate:
            return super()._grads(network, phase_1, phase_2, weights, batch)
        return ep_difference(network, phase_1, phase_2, weights), True

    def estimate(self, network: Network, phase_1: State, phase_2: State, weights: Tensor) -> list[Tensor]:
        """dE/dtheta(phase_2) - dE/dtheta(phase_1), weighted per example (``network.energy_param_grads``)."""
        return ep_difference(network, phase_1, phase_2, weights)


def ep_difference(network: Network, s1: State, s2: State, weights: float | Tensor) -> list[Tensor]:
    """``energy_param_grads(s2, w) - energy_param_grads(s1, w)`` as one fused difference, fresh tensors.

    For a dense term, (w r_post2)^T r_pre2 - (w r_post1)^T r_pre1 = (w dpost)^T r_pre2 + (w r_post1)^T dpre with
    d = r2 - r1: a layer equal in both states (the clamped input) contributes no product, so the largest
    matrix (784x500) costs one GEMM instead of two; and the small differences lose less to cancellation.
    """
    batch = s2[0].shape[0]
    coef = -weights[:, None] / batch if isinstance(weights, Tensor) else -weights / batch
    r2 = network.rates(s2)
    same = [i in network.clamped and (s1[i] is s2[i] or torch.equal(s1[i], s2[i])) for i in range(len(s2))]
    r1 = [r2[i] if same[i] else rho.rho(s1[i]) for i, rho in enumerate(network.rhos)]
    # -(w/B) (r2 - r1) per layer: the post side of every product and, summed over the batch, the bias gradient
    scaled = [None if same[i] else (r2[i] - r1[i]).mul_(coef) for i in range(len(s2))]
    grads: dict[int, Tensor] = {}
    for term in network.interactions:
        if type(term) is Dense:
            pre, post = term.pre, term.post
            g = torch.mm(scaled[post].T, r2[pre]) if scaled[post] is not None else None
            if scaled[pre] is not None:  # (coef r_post1)^T dpre = r_post1^T (coef dpre): coef scales rows
                g = torch.mm(r1[post].T, scaled[pre]) if g is None else g.addmm_(r1[post].T, scaled[pre])
            grads[id(term.weight)] = g if g is not None else torch.zeros_like(term.weight)
        else:
            w = weights if isinstance(weights, Tensor) else torch.full((batch,), weights, dtype=r2[-1].dtype,
                                                                        device=r2[-1].device)
            for p, a, b in zip(term.parameters(), term.param_grads(r2, w), term.param_grads(r1, w)):
                grads[id(p)] = a - b
    for layer in network.free:
        grads[id(network.bias(layer))] = scaled[layer].sum(0) if scaled[layer] is not None else \
            torch.zeros_like(network.bias(layer))
    return [grads[id(p)] for p in network.parameters()]


class STDP(_Contrastive):
    """The seed's rule dW_ij ~ (ds_i/dt) rho(s_j), accumulated online over the nudged phase (BF-17).

    ``form``: ``"plain"`` (ds_post/dt rho(s_pre), the seed), ``"xie_seung"`` (d rho(s_post)/dt rho(s_pre),
    EP17 eq. 12) or ``"tied"`` (d/dt [rho_i rho_j], EP17 eq. 13, whose integral is the EP update).
    The post unit is the one closer to the driven layer: it moves first (THEORY A15).
    """

    name = "stdp"

    def __init__(self, beta: float, form: str = "plain", variant: str = "positive",
                 relaxation: Relaxation | None = None, cost: Cost | None = None):
        super().__init__(beta, variant, relaxation, cost)
        if form not in STDP_FORMS:
            raise ValueError(f"unknown STDP form {form!r}; choose one of {', '.join(STDP_FORMS)}")
        self.form = form

    def _compiled_form(self) -> str | None:
        return self.form if type(self) is STDP else None  # a subclass may change a phase or the sum

    def _phase(self, network: Network, free: State, nu, target: Tensor, static: list | None = None) -> list | None:
        if _is_zero(nu):
            return None
        # the rule integrates ds/dt of the leaky integrator itself, whatever solved the free phase
        _, diag = self.relaxation.nudged(network, free, nu, target, self.cost, record_trajectory=True,
                                         method="euler", static=static, internal=True)
        return diag.trajectory

    def estimate(self, network, phase_1, phase_2, weights: Tensor) -> list[Tensor]:
        a2 = self.accumulate(network, phase_2, weights)
        a1 = self.accumulate(network, phase_1, weights)
        return [-(x - y) for x, y in zip(a2, a1)]

    def accumulate(self, network: Network, trajectory: list[State] | None, weights: Tensor) -> list[Tensor]:
        """A(nu) = sum over the nudged steps of the pairwise products, aligned with network.parameters().

        Where a step's product is a difference (the tied form's, the biases') or is linear in the change with its
        other factor fixed (a clamped partner's rate), the sum over the steps telescopes: it is computed once, from
        the phase's first and last states (the same sum up to round-off; tests/rules/test_stdp_sum.py). Only the
        couplings between two free layers in the plain and Xie-Seung forms are summed step by step.
        """
        params = list(network.parameters())
        if trajectory is None:
            return [torch.zeros_like(p) for p in params]
        rank = _closeness(network)
        rates = [network.rates(state) for state in trajectory]  # once per state: step t's "after" is t+1's "before"
        whole = self._post_change(network, trajectory[0], trajectory[-1], rates[0], rates[-1], weights)
        total = {id(network.bias(layer)): whole[layer].mean(0) for layer in network.free}
        stepwise = []
        for term in network.interactions:
            if self._telescopes(term, network, rank):
                total[id(term.weight)] = self._term_update(term, rates[0], rates[-1], whole, rank, weights)
            else:
                stepwise.append(term)
                total[id(term.weight)] = torch.zeros_like(term.weight)
        for t in range(len(trajectory) - 1 if stepwise else 0):
            change = self._post_change(network, trajectory[t], trajectory[t + 1], rates[t], rates[t + 1], weights)
            for term in stepwise:
                total[id(term.weight)] += self._term_update(term, rates[t], rates[t + 1], change, rank, weights)
        return [total[id(p)] for p in params]

    def _telescopes(self, term, network: Network, rank: dict[int, int]) -> bool:
        """Whether the term's per-step products sum to one product of the phase's ends: the tied form's always
        (a difference of one function of the state), the others' where the pre-synaptic layer is clamped."""
        if self.form == "tied":
            return True
        if not isinstance(term, Coupling):  # a lateral term's both sides move
            return False
        pre = term.pre if rank[term.post] <= rank[term.pre] else term.post
        return pre in network.clamped

    def _post_change(self, network, before, after, r0, r1, weights) -> list[Tensor | None]:
        """Per-example weighted change of each free layer: ds (plain) or d rho (Xie-Seung, tied)."""
        out: list[Tensor | None] = [None] * len(before)
        for layer in network.free:
            delta = after[layer] - before[layer] if self.form == "plain" else r1[layer] - r0[layer]
            out[layer] = delta * weights[:, None]
        return out

    def _term_update(self, term, r0, r1, change, rank, weights) -> Tensor:
        batch = r0[0].shape[0]
        if isinstance(term, Dense):
            if self.form == "tied":
                w = weights[:, None]
                return ((r1[term.post] * w).T @ r1[term.pre] - (r0[term.post] * w).T @ r0[term.pre]) / batch
            if rank[term.post] <= rank[term.pre]:  # term.post is the post-synaptic side
                return change[term.post].T @ r0[term.pre] / batch
            return r0[term.post].T @ change[term.pre] / batch
        if isinstance(term, Lateral):
            layer = term.layer
            if self.form == "tied":
                w = weights[:, None]
                m = (r1[layer] * w).T @ r1[layer] - (r0[layer] * w).T @ r0[layer]
            else:
                m = change[layer].T @ r0[layer] + r0[layer].T @ change[layer]
            return 0.5 * m * (1 - torch.eye(m.shape[0], dtype=m.dtype, device=m.device)) / batch
        if isinstance(term, Coupling):  # any bilinear two-layer term: its own -dE/dtheta with substituted rates
            return _coupling_update(term, r0, r1, change, rank, weights, self.form)
        raise NotImplementedError(f"the STDP rule does not know the interaction {type(term).__name__}")


def _coupling_update(term: Coupling, r0, r1, change, rank, weights: Tensor, form: str) -> Tensor:
    """The STDP products of a general coupling (e.g. a convolution), through its parameter gradient.

    ``param_grads`` of a bilinear term is -mean_b r_post (x) r_pre, so the plain/Xie-Seung products
    change_post (x) rho_pre are minus it at rates (pre: r0, post: change); the tied form is the
    difference of -dE/dtheta between the two states.
    """
    if form == "tied":
        return term.param_grads(r0, weights)[0] - term.param_grads(r1, weights)[0]
    rates = list(r0)
    if rank[term.post] <= rank[term.pre]:
        rates[term.post] = change[term.post]
    else:
        rates[term.pre] = change[term.pre]
    return -term.param_grads(rates)[0]


def _closeness(network: Network) -> dict[int, int]:
    """Distance of each layer from the driven layer (clamped inputs are the farthest)."""
    dist = network.distances()
    far = max(dist.values()) + 1
    return {i: dist.get(i, far) for i in range(len(network.sizes))}
