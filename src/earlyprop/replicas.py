"""Replicas of the public EP codes' training steps, timed beside ours by ``earlyprop bench`` (issue 4).

Issue 4 quotes the anchors' ms per batch measured on another machine; these replicas let one run measure the
speedup on the machine at hand. Each one is written here from the anchor's published algorithm (ANCHORS.md;
none of their code is copied, three of them carry no licence) and keeps what sets its cost: the ops it runs
per step and per batch, in the anchor's own style. Each takes its weights from an earlyprop
:class:`~earlyprop.network.Network` and writes ``.grad`` of that network's parameters, so tests/speed/
test_replicas.py can check that it computes the gradient earlyprop computes (float64): LA21's for the same budget,
ER19's with two of its choices switched to ours (flags of the same code), RAIN23's once both solvers have
converged (its output update is an iteration, ours the exact minimiser). The speedup is then between two
computations of one number.

- :class:`LA21Step`: everything from the scalar Phi = -E + ... by autograd, every step
  (s <- rho(dPhi/ds), the input's drive included), the update as one backward of Phi's difference.
- :class:`ER19Step`: the hand-written leaky dynamics, one list of per-layer tensors per step, the Hebbian
  update from the rates of both phases.
- :class:`RAIN23Step`: layer objects updated block by block (every other free layer from the first, then the
  rest), each update summing its interactions' contributions, centered EP's two nudged phases from the free
  state.

Where an anchor's own choice would make it slower (LA21's MNIST rate is a 5-op logistic, its cost is computed
in float64 and its per-step ``grad_outputs`` built from a Python list; ER19 moves states to the device every
batch; RAIN23's trainer computes 14 statistics per batch), the replica takes the cheaper path, so the speedups
it measures are, if anything, too small.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from earlyprop.interactions import Dense
from earlyprop.network import Network
from earlyprop.nonlinearity import Sigmoid


def _layered_weights(network: Network) -> list[Tensor]:
    """W_k (n_k, n_{k-1}) of a plain layered chain, k = 1..L, in order."""
    pairs = sorted(network.layered_pairs(), key=lambda term: term.pre)
    if [type(t) for t in network.interactions] != [Dense] * (len(network.sizes) - 1) or len(pairs) != len(
            network.interactions):
        raise ValueError("the replicas run plain layered chains (one Dense term per consecutive pair)")
    return [term.weight for term in pairs]


class LA21Step:
    """LA21's ``P_MLP`` training step (Laborieux et al. 2021), one-sided EP.

    Phi(s) = sum_k <s_{k-1} W_k^T + b_k, s_k> - beta C(s_L); each of ``free_steps`` then ``nudge_steps`` steps
    evaluates Phi (the input's product included) and sets s <- rho(dPhi/ds) by ``torch.autograd.grad``; the
    gradient is the backward of (Phi_nudged - Phi_free) / (0 - beta), batch-averaged; the running accuracy
    reads the free state's argmax (a host read), as LA21's loop does.
    This is earlyprop's Euler step with eps = 1 and projection (for rho = clip to [0, 1]).
    """

    def __init__(self, network: Network, free_steps: int, nudge_steps: int, beta: float):
        self.network, self.weights = network, _layered_weights(network)
        self.biases = [network.bias(layer) for layer in network.free]
        self.rhos: list[Callable[[Tensor], Tensor]] = [network.rhos[layer].rho for layer in network.free]
        self.free_steps, self.nudge_steps, self.beta = free_steps, nudge_steps, beta

    def phi(self, x: Tensor, target: Tensor, neurons: list[Tensor], beta: float) -> Tensor:
        layers = [x, *neurons]
        phi = 0.0
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            phi = phi + (torch.nn.functional.linear(layers[k], w, b) * layers[k + 1]).sum(dim=1)
        if beta != 0.0:
            phi = phi - beta * 0.5 * ((layers[-1] - target) ** 2).sum(dim=1)
        return phi

    def relax(self, x: Tensor, target: Tensor, neurons: list[Tensor], steps: int, beta: float) -> list[Tensor]:
        for _ in range(steps):
            phi = self.phi(x, target, neurons, beta)
            ones = torch.ones(x.shape[0], dtype=phi.dtype, device=x.device)
            grads = torch.autograd.grad(phi, neurons, grad_outputs=ones)
            neurons = [rho(g).requires_grad_() for rho, g in zip(self.rhos, grads)]
        return neurons

    def compute_grads(self, x: Tensor, target: Tensor) -> int:
        """Write the EP gradient into the network's ``.grad``; return the free phase's correct predictions."""
        neurons = [torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device, requires_grad=True)
                   for n in self.network.sizes[1:]]
        neurons = self.relax(x, target, neurons, self.free_steps, 0.0)
        free = _copy(neurons)
        with torch.no_grad():
            correct = (free[-1].argmax(dim=1) == target.argmax(dim=1)).sum().item()
        nudged = _copy(self.relax(x, target, neurons, self.nudge_steps, self.beta))
        for p in self.network.parameters():
            p.grad = None
        phi_free = self.phi(x, target, free, 0.0).mean()
        phi_nudged = self.phi(x, target, nudged, self.beta).mean()
        ((phi_nudged - phi_free) / (0.0 - self.beta)).backward()
        return correct


def _copy(neurons: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(n).copy_(n.detach()).requires_grad_() for n in neurons]


class ER19Step:
    """ER19's ``EPcont`` training step (Ernoult et al. 2019, continuous-time EP), one-sided EP.

    Each step rebuilds the list of ds/dt: -s_L + W_L rho(s_{L-1}) + b_L (+ beta (d - s_L) when nudged) on the
    output, -s_k + rho'(s_k) (W_k rho(s_{k-1}) + b_k + W_{k+1}^T rho(s_{k+1})) on hidden layers (the input's
    product and rho(x) recomputed every step, rho' = 4 rho (1 - rho) calling rho again), then s <- s + dt ds/dt,
    clipped to [0, 1] with ds/dt zeroed where a unit hits a bound (``clamp``). The free state is cloned, the
    prediction and cost are read once per batch (a host read), and the update is the Hebbian difference of the
    rates of both phases over beta and the batch.
    With ``output_rho_prime=True, clamp=False`` this is earlyprop's Euler step (eps = dt, nudge scaled by eps)
    for logistic rates; ER19's code has ``output_rho_prime=False, clamp=True`` (same ops within a few).
    """

    def __init__(self, network: Network, free_steps: int, nudge_steps: int, dt: float, beta: float,
                 output_rho_prime: bool = False, clamp: bool = True):
        rho = network.rhos[1]
        if type(rho) is not Sigmoid or any(type(r) is not Sigmoid or vars(r) != vars(rho) for r in network.rhos):
            raise ValueError("the ER19 replica runs logistic rates, the same on every layer")
        self.network, self.weights = network, _layered_weights(network)
        self.biases = [network.bias(layer) for layer in network.free]
        self.rho, self.gain = rho.rho, rho.gain
        self.free_steps, self.nudge_steps, self.dt, self.beta = free_steps, nudge_steps, dt, beta
        self.output_rho_prime, self.clamp = output_rho_prime, clamp
        self.cost_sum: Tensor | float = 0.0

    def rho_prime(self, s: Tensor) -> Tensor:
        return self.gain * self.rho(s) * (1 - self.rho(s))

    def step(self, x: Tensor, s: list[Tensor], target: Tensor | None = None, beta: float = 0.0) -> list[Tensor]:
        w, b, last = self.weights, self.biases, len(s)
        layers = [x, *s]
        dsdt = []
        for k in range(1, last + 1):
            field = torch.nn.functional.linear(self.rho(layers[k - 1]), w[k - 1], b[k - 1])
            if k == last:
                drive = self.rho_prime(s[k - 1]) * field if self.output_rho_prime else field
                ds = -s[k - 1] + drive
                if beta:
                    ds = ds + beta * (target - s[k - 1])
            else:
                ds = -s[k - 1] + self.rho_prime(s[k - 1]) * (field + torch.mm(self.rho(layers[k + 1]), w[k]))
            dsdt.append(ds)
        s = [s_k + self.dt * ds for s_k, ds in zip(s, dsdt)]
        if self.clamp:
            s = [s_k.clamp(min=0).clamp(max=1) for s_k in s]
            # ER19 zeroes ds/dt at the bounds here and then returns s alone: the ops are part of its step
            dsdt = [torch.where((s_k == 0) | (s_k == 1), torch.zeros_like(ds), ds) for s_k, ds in zip(s, dsdt)]
        return s

    @torch.no_grad()
    def compute_grads(self, x: Tensor, target: Tensor) -> int:
        """Write the EP gradient into the network's ``.grad``; return the free phase's correct predictions."""
        s = [torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device) for n in self.network.sizes[1:]]
        for _ in range(self.free_steps):
            s = self.step(x, s)
        free = [s_k.clone() for s_k in s]
        correct = int(free[-1].argmax(dim=1).eq(target.argmax(dim=1)).sum())  # ER19's one host read per batch
        self.cost_sum = self.cost_sum + 0.5 * ((free[-1] - target) ** 2).sum() / x.shape[0]  # stays on the device
        for _ in range(self.nudge_steps):
            s = self.step(x, s, target, self.beta)
        scale = -1.0 / (self.beta * x.shape[0])  # ER19 adds the Hebbian difference; .grad is its negative
        layers_n, layers_f = [x, *s], [x, *free]
        for k, (w, b) in enumerate(zip(self.weights, self.biases), start=1):
            post = self.rho(layers_n[k]) - self.rho(layers_f[k])
            if k == 1:
                w.grad = scale * torch.mm(post.t(), self.rho(x))
            else:
                w.grad = scale * (torch.mm(self.rho(layers_n[k]).t(), self.rho(layers_n[k - 1]))
                                  - torch.mm(self.rho(layers_f[k]).t(), self.rho(layers_f[k - 1])))
            b.grad = scale * post.sum(0)
        return correct


class _Layer:
    """A layer variable, as RAIN23 keeps it: a state tensor read and replaced through an object."""

    def __init__(self, activate: Callable[[Tensor], Tensor]):
        self.state: Tensor | None = None
        self.activate = activate


class _Bias:
    def __init__(self, layer: _Layer, bias: Tensor):
        self.layer, self.bias, self.layers = layer, bias, (layer,)

    def grad_layer(self, layer: _Layer) -> Tensor:  # dE/ds of -b.s
        return -self.bias.unsqueeze(0)

    def param_grad(self) -> Tensor:
        return -self.layer.state.mean(0)


class _Dense:
    def __init__(self, pre: _Layer, post: _Layer, weight: Tensor):
        self.pre, self.post, self.weight = pre, post, weight  # weight (n_post, n_pre)
        self.layers = (pre, post)

    def grad_layer(self, layer: _Layer) -> Tensor:  # dE/ds of -s_pre W^T s_post, on either side
        if layer is self.post:
            return -torch.tensordot(self.pre.state, self.weight.t(), dims=1)
        return -torch.tensordot(self.post.state, self.weight, dims=1)

    def param_grad(self) -> Tensor:
        return -torch.tensordot(self.post.state, self.pre.state, dims=([0], [0])) / self.pre.state.shape[0]


class _Nudging:
    """beta C(y) with C = 1/2 |y - d|^2; its layer gradient by autograd (RAIN23's generic fallback)."""

    def __init__(self, layer: _Layer, beta: float, target: Tensor):
        self.layer, self.beta, self.target, self.layers = layer, beta, target, (layer,)

    def grad_layer(self, layer: _Layer) -> Tensor:
        y = layer.state.detach().requires_grad_(True)
        with torch.enable_grad():
            cost = (self.beta * 0.5 * ((y - self.target) ** 2).sum(dim=1)).sum()
            (grad,) = torch.autograd.grad(cost, y)
        return grad


class RAIN23Step:
    """RAIN23's training step for a dense Hopfield chain (Scellier et al. 2023), centered EP, asynchronous
    block updates.

    Layers are objects, the energy a list of interaction objects (biases, then dense terms); a layer update
    sums the gradients of the terms that touch it (the input's product every time: nothing is cached) and
    sets s_k <- rho(-dE/ds_k), every other free layer from the first (RAIN23's ``[::2]``) then the rest, ``iterations``
    times per phase. The two nudged
    phases (-beta, +beta) start from the free state and add the nudging term (by autograd) to the output's
    update, y <- rho(b + h W^T - beta (y - d)); the layers keep the +beta state for the next batch's free phase.
    The gradient is the difference of each term's dE/dtheta at the two nudged states over 2 beta. The
    per-batch statistics RAIN23's trainer also computes (energy, cost, error, norms: 14 host reads) are left
    out. At convergence this is earlyprop's centered EP with the asynchronous solver (same fixed points).
    """

    def __init__(self, network: Network, free_iterations: int, nudge_iterations: int, beta: float):
        weights = _layered_weights(network)
        self.network = network
        self.layers = [_Layer(lambda s: s), *(_Layer(network.rhos[k].rho) for k in network.free)]
        self.terms = [_Bias(self.layers[k], network.bias(k)) for k in network.free]
        self.terms += [_Dense(self.layers[k], self.layers[k + 1], w) for k, w in enumerate(weights)]
        self.params = [network.bias(k) for k in network.free] + weights
        self.free_iterations, self.nudge_iterations, self.beta = free_iterations, nudge_iterations, beta
        self.groups = [self.layers[1:][::2], self.layers[1:][1::2]]

    def minimise(self, terms: list, iterations: int) -> None:
        touching = {layer: [term for term in terms if layer in term.layers] for layer in self.layers[1:]}
        for _ in range(iterations):
            for group in self.groups:
                for layer in group:
                    layer.state = layer.activate(-sum(term.grad_layer(layer) for term in touching[layer]))

    def compute_grads(self, x: Tensor, target: Tensor) -> None:
        """Write the centered EP gradient into the network's ``.grad``."""
        with torch.no_grad():
            self.layers[0].state = x
            if self.layers[1].state is None or self.layers[1].state.shape[0] != x.shape[0]:
                for layer, n in zip(self.layers[1:], self.network.sizes[1:]):
                    layer.state = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
            self.minimise(self.terms, self.free_iterations)
            free = [layer.state for layer in self.layers]
            grads = []
            for beta in (-self.beta, self.beta):
                for layer, state in zip(self.layers, free):
                    layer.state = state
                self.minimise([*self.terms, _Nudging(self.layers[-1], beta, target)], self.nudge_iterations)
                grads.append([term.param_grad() for term in self.terms])
            for p, g_minus, g_plus in zip(self.params, *grads):
                p.grad = (g_plus - g_minus) / (2 * self.beta)


def build_replica(cfg, network: Network):
    """The replica of a bench config's anchor (``cfg.anchor``) on ``network``, with the config's budget; None when
    the anchor has none."""
    if cfg.anchor == "LA21":
        return LA21Step(network, cfg.free_steps, cfg.nudge_steps, cfg.beta)
    if cfg.anchor == "ER19":
        return ER19Step(network, cfg.free_steps, cfg.nudge_steps, cfg.eps, cfg.beta)
    if cfg.anchor == "RAIN23":
        return RAIN23Step(network, cfg.free_steps, cfg.nudge_steps, cfg.beta)
    return None
