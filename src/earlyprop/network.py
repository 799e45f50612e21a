"""The energy-based network: layers, symmetric interactions, energy, drive and gradients.

A state is a list of per-layer tensors, batch first, with the clamped input at index 0.
The network stores parameters only; it never stores a state between calls.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from earlyprop.interactions import Coupling, Dense, Interaction, Lateral, gaussian_fan_in, glorot_uniform
from earlyprop.nonlinearity import Nonlinearity, get_nonlinearity

State = list[Tensor]


class Network(nn.Module):
    """A set of layers coupled by symmetric interaction terms (THEORY §1.4–1.6).

    Energy (BF-4), per example::

        E(s) = 1/2 sum_l ||s_l||^2 - sum_terms rho^T W rho - sum_l b_l^T rho(s_l)

    where the first and last sums run over the free (unclamped) layers.

    Parameters
    ----------
    sizes : unit count of each layer; layer 0 is the input.
    interactions : the energy's interaction terms (``Dense``, ``Lateral``, ...).
    rhos : one nonlinearity per layer.
    clamped : indices of clamped (input) layers.
    driven : index of the layer that receives the outside driving force (THEORY A3).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        interactions: Iterable[Interaction],
        rhos: Sequence[Nonlinearity | str],
        clamped: Sequence[int] = (0,),
        driven: int = -1,
    ):
        super().__init__()
        self.sizes = tuple(int(n) for n in sizes)
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"a network needs at least two layers of positive size, got sizes={list(sizes)}")
        if len(rhos) != len(self.sizes):
            raise ValueError(f"{len(rhos)} nonlinearities given for {len(self.sizes)} layers")
        self.rhos = [get_nonlinearity(r) for r in rhos]
        self.clamped = tuple(sorted(i % len(self.sizes) for i in clamped))
        self.free = tuple(i for i in range(len(self.sizes)) if i not in self.clamped)
        self.driven = driven % len(self.sizes)
        if self.driven in self.clamped:
            raise ValueError(f"the driven layer {self.driven} cannot be clamped")
        self.interactions = nn.ModuleList(interactions)
        for term in self.interactions:
            if any(not 0 <= i < len(self.sizes) for i in term.layers):
                raise ValueError(f"interaction {term} refers to a layer outside 0..{len(self.sizes) - 1}")
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.sizes[i], dtype=torch.float64)) for i in self.free]
        )
        # ParameterList's own indexing costs ~5 us (it runs on every phase): read its registry by key instead
        self._bias_of = {layer: str(k) for k, layer in enumerate(self.free)}
        self.memo = Memo()  # structures derived from the parameters, for the fast paths (earlyprop.chain)

    def _apply(self, fn, *args, **kwargs):  # to(), cuda(), double(), ...: new parameter tensors
        self.memo.clear()  # (the old ones would stay alive in the memo's layouts)
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def layered(
        cls,
        sizes: Sequence[int],
        rho: Nonlinearity | str = "tanh",
        *,
        input_rho: Nonlinearity | str | None = None,
        output_rho: Nonlinearity | str | None = None,
        skip: Iterable[tuple[int, int]] = (),
        lateral: Iterable[int] = (),
        init: str = "glorot",
        gain: float = 1.0,
        bias_std: float = 0.0,
        seed: int | None = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Network:
        """The seed's layered chain x - h_L - ... - h_1 - y, optionally with skip or lateral terms.

        ``init`` is ``"glorot"`` (EP17) or ``"gaussian"`` (N(0, gain^2/fan_in), THEORY RC);
        lateral matrices start at zero. ``input_rho``/``output_rho`` default to ``rho``
        (``output_rho="linear"`` gives the linear output of THEORY A8).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        pairs = [(i, i + 1) for i in range(len(sizes) - 1)] + [tuple(p) for p in skip]
        terms: list[Interaction] = []
        for pre, post in pairs:
            if init == "glorot":
                w = glorot_uniform(sizes[post], sizes[pre], gen) * gain
            elif init == "gaussian":
                w = gaussian_fan_in(sizes[post], sizes[pre], gain, gen)
            else:
                raise ValueError(f"unknown init {init!r}; choose 'glorot' or 'gaussian'")
            terms.append(Dense(pre, post, sizes[pre], sizes[post], w))
        terms += [Lateral(layer, sizes[layer], torch.zeros(sizes[layer], sizes[layer])) for layer in lateral]
        rhos: list[Nonlinearity | str] = [rho] * len(sizes)
        rhos[0] = input_rho if input_rho is not None else rho
        rhos[-1] = output_rho if output_rho is not None else rho
        net = cls(sizes, terms, rhos)
        if bias_std > 0:
            with torch.no_grad():
                for b in net.biases:
                    b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * bias_std)
        return net.to(dtype)

    # ----------------------------------------------------------------- state helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.bias(self.free[0]).dtype

    @property
    def device(self) -> torch.device:
        return self.bias(self.free[0]).device

    def bias(self, layer: int) -> Tensor:
        return self.biases._parameters[self._bias_of[layer]]

    def init_state(self, x: Tensor | Sequence[Tensor]) -> State:
        """The resting state s = 0 with the input(s) clamped; ``x`` is one tensor per clamped layer."""
        xs = self.clamped_inputs(x)
        state: State = [None] * len(self.sizes)  # type: ignore[list-item]
        for layer, xi in zip(self.clamped, xs):
            state[layer] = xi
        for layer in self.free:
            state[layer] = torch.zeros(xs[0].shape[0], self.sizes[layer], dtype=self.dtype, device=self.device)
        return state

    def clamped_inputs(self, x: Tensor | Sequence[Tensor], values: bool = True) -> list[Tensor]:
        """The input(s) of :meth:`init_state`, checked (count, shapes, batch sizes, and with ``values`` finite
        values) and in the network's dtype, one per clamped layer."""
        xs = [x] if isinstance(x, Tensor) else list(x)
        if len(xs) != len(self.clamped):
            raise ValueError(f"expected {len(self.clamped)} clamped input tensor(s), got {len(xs)}")
        for layer, xi in zip(self.clamped, xs):
            self._check_layer_tensor(xi, layer, "input", values)
            if xi.shape[0] != xs[0].shape[0]:
                raise ValueError("all clamped inputs must have the same batch size")
        return [xi.to(self.dtype) for xi in xs]

    def check_state(self, state: Sequence[Tensor], values: bool = True) -> None:
        """Raise ValueError on a state of the wrong length, shape or (``values``) with non-finite values."""
        if len(state) != len(self.sizes):
            raise ValueError(f"state has {len(state)} layers, network has {len(self.sizes)}")
        batch = state[0].shape[0] if state[0].dim() else None
        for layer, s in enumerate(state):
            self._check_layer_tensor(s, layer, "state", values)
            if s.shape[0] != batch:
                raise ValueError(f"state layer {layer} has batch size {s.shape[0]}, layer 0 has {batch}")

    def _check_layer_tensor(self, t: Tensor, layer: int, what: str, values: bool = True) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} of layer {layer} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != self.sizes[layer]:
            raise ValueError(
                f"{what} of layer {layer} has shape {tuple(t.shape)}, expected (batch, {self.sizes[layer]})"
            )
        if values and not all_finite(t):
            raise ValueError(f"{what} of layer {layer} contains NaN or inf")

    # ----------------------------------------------------------------- the energy
    def rates(self, state: Sequence[Tensor]) -> list[Tensor]:
        """rho_l(s_l) for every layer."""
        return [rho.rho(s) for rho, s in zip(self.rhos, state)]

    def fields(
        self, state: Sequence[Tensor], rates: Sequence[Tensor] | None = None,
        static: Sequence[Tensor | None] | None = None, targets: Sequence[int] | None = None,
    ) -> list[Tensor | None]:
        """h_l = b_l + sum_j W_lj rho(s_j) = -dE/d rho(s_l) for free layers (None for clamped ones).

        ``static`` is :meth:`static_fields` of the same clamped inputs: passing it saves recomputing
        the input's drive at every step of a phase. ``targets`` limits the work to those free layers.
        """
        terms = self._free_terms() if targets is None else \
            [t for t in self._free_terms() if any(layer in targets for layer in t.layers)]
        if rates is None:  # only the rates these terms (and, without static, the input terms) read
            needed = set(range(len(state))) if targets is None else \
                {layer for t in terms for layer in t.layers} | (set(self.clamped) if static is None else set())
            rates = [rho.rho(s) if i in needed else None for i, (rho, s) in enumerate(zip(self.rhos, state))]
        out: list[Tensor | None] = list(static) if static is not None else self.static_fields(state, rates, targets)
        for term in terms:
            for layer, field in term.fields(rates, self.free if targets is None else targets).items():
                out[layer] = out[layer] + field
        return out

    def static_fields(self, state: Sequence[Tensor], rates: Sequence[Tensor] | None = None,
                      targets: Sequence[int] | None = None) -> list[Tensor | None]:
        """The part of each free layer's field that only depends on clamped layers: bias + input drive, each a
        contiguous (batch, n_l) tensor.

        ``targets`` limits the work to those free layers (the others stay None)."""
        layers = self.free if targets is None else [m for m in self.free if m in targets]
        out: list[Tensor | None] = [None] * len(self.sizes)
        batch = state[self.clamped[0]].shape[0] if self.clamped else state[self.free[0]].shape[0]
        for layer in layers:
            out[layer] = self.bias(layer).expand(batch, self.sizes[layer])
        input_terms = [t for t in self.interactions if not self._couples_free_layers_only(t)
                       and any(m in layers for m in t.layers)]
        if input_terms:
            clamped_rates = [(rates[i] if rates is not None else self.rhos[i].rho(s)) if i in self.clamped else None
                             for i, s in enumerate(state)]  # the free layers' rates do not enter
            for term in input_terms:
                if type(term) is Dense and term.pre in self.clamped and term.post in self.free:
                    # b + rho(x) W^T as one addmm: no separate product and sum (this runs once per batch)
                    out[term.post] = torch.addmm(out[term.post], clamped_rates[term.pre], term.weight.T)
                    continue
                for layer, field in term.fields(clamped_rates, layers).items():
                    out[layer] = out[layer] + field
        # a bias alone is still a stride-0 view: materialise it once here, not in every phase that reads it
        return [t if t is None or t.is_contiguous() else t.contiguous() for t in out]

    def _couples_free_layers_only(self, term: Interaction) -> bool:
        return all(layer in self.free for layer in term.layers)

    def _free_terms(self) -> list[Interaction]:
        return [t for t in self.interactions if self._couples_free_layers_only(t)]

    def energy(self, state: Sequence[Tensor]) -> Tensor:
        """E(s) per example, shape (batch,) (BF-4)."""
        rates = self.rates(state)
        e = sum(0.5 * (state[i] ** 2).sum(-1) - (rates[i] * self.bias(i)).sum(-1) for i in self.free)
        for term in self.interactions:
            e = e + term.energy(rates)
        return e

    def drive(self, state: Sequence[Tensor]) -> list[Tensor]:
        """R_l(s) = rho'(s_l) * h_l (BF-5); clamped layers return their own state (no motion)."""
        fields = self.fields(state)
        return [
            s if h is None else rho.rho_prime(s) * h for s, h, rho in zip(state, fields, self.rhos)
        ]

    def grad_energy(self, state: Sequence[Tensor]) -> list[Tensor]:
        """dE/ds = s - R(s) (BF-3); zero on clamped layers."""
        return [s - r for s, r in zip(state, self.drive(state))]

    def energy_param_grads(self, state: Sequence[Tensor], weights: Tensor | None = None) -> list[Tensor]:
        """d(mean_batch w_b E_b)/d theta in closed form, aligned with ``self.parameters()``.

        For a dense term dE/dW = -rho(s_post) rho(s_pre)^T, for a bias -rho(s) (DESIGN principle 1).
        ``weights`` (batch,) defaults to ones.
        """
        rates = self.rates(state)
        grads: dict[int, Tensor] = {}
        for term in self.interactions:
            for p, g in zip(term.parameters(), term.param_grads(rates, weights)):
                grads[id(p)] = g
        for layer in self.free:
            r = rates[layer] if weights is None else rates[layer] * weights[:, None]
            grads[id(self.bias(layer))] = -r.mean(0)
        return [grads[id(p)] for p in self.parameters()]

    def distances(self) -> dict[int, int]:
        """Graph distance of every free layer from the driven layer through the interaction terms."""
        neighbours: dict[int, set[int]] = {i: set() for i in range(len(self.sizes))}
        for term in self.interactions:
            for a in term.layers:
                neighbours[a].update(b for b in term.layers if b != a)
        dist = {self.driven: 0}
        queue = deque([self.driven])
        while queue:
            a = queue.popleft()
            for b in sorted(neighbours[a]):
                if b not in dist and b in self.free:
                    dist[b] = dist[a] + 1
                    queue.append(b)
        return dist

    def layered_pairs(self) -> list[Coupling]:
        """The two-layer terms between consecutive layers (dense or convolutional), input to output."""
        return [t for t in self.interactions if isinstance(t, Coupling) and t.post == t.pre + 1]

    def extra_repr(self) -> str:
        rhos = ",".join(r.name for r in self.rhos)
        return f"sizes={list(self.sizes)}, rhos=[{rhos}], clamped={self.clamped}, driven={self.driven}"


class Memo(dict):
    """A network's memo of structures derived from its layout and parameters (the lean chain's layouts, keyed
    by what they depend on, the parameters' identity and storage included). A copy or a pickle of the network
    starts with an empty one: the entries hold views of the original's parameters."""

    def __deepcopy__(self, memo: dict) -> Memo:
        return Memo()

    def __reduce__(self) -> tuple:
        return Memo, ()


def all_finite(t: Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``, about 10x cheaper on CPU.

    isfinite builds several full-size temporaries (~30-50 us for a 20x784 batch, more than a whole lean
    relaxation step), while a sum is one reduction that is NaN or inf whenever any element is; only when
    it is not finite (a NaN/inf, or an overflow of finite values) does the exact check run.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return t.numel() == 0 or bool(torch.isfinite(t).all())
    return math.isfinite(float((t.detach() if t.requires_grad else t).sum())) or bool(torch.isfinite(t).all())

