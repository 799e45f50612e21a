"""The budgets that ``earlyprop bench`` times (issue 4's configs A-D, the GPU config G, issue 6's conv configs M and
N) and their FLOP floors: the multiply-adds a lean EP step cannot avoid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# the large sgemm whose rate converts FLOP floors to ms: the input layer's product at a big batch on CPU,
# on a GPU a square product large enough to reach the device's fp32 peak
SGEMM_SHAPE = (1024, 784, 500)
CUDA_SGEMM_SHAPE = (4096, 4096, 4096)


@dataclass(frozen=True)
class BenchConfig:
    """One training budget: network, batch, phases, solver and the public code it is compared with."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    free_steps: int
    nudge_steps: int
    eps: float
    beta: float
    variant: str = "positive"  # EP variant: positive (one-sided) or centered
    method: str = "euler"
    omega: float = 1.0  # over-relaxation of the async solver
    rho: str = "hard_sigmoid"
    nudge_scale: str = "eps"
    project: bool = True
    repeats: int = 200
    image: tuple[int, ...] = ()  # (C, H, W) of the input when the net starts with conv layers
    conv: tuple[str, ...] = ()  # earlyprop.conv specs, e.g. ("32:5:max", "64:5:max")
    gain: float = 1.0
    anchor: str | None = None
    anchor_ms: float | None = None  # the anchor's ms per batch on this machine class (issue 4), 1 thread

    @property
    def nudged_phases(self) -> int:
        return 2 if self.variant == "centered" else 1

    def phases(self) -> str:
        nudged = f"{self.nudged_phases}x{self.nudge_steps}" if self.nudged_phases > 1 else str(self.nudge_steps)
        kind = {"positive": "P-EP", "centered": "C-EP"}[self.variant]
        solver = f"{self.method} omega={self.omega:g}" if self.omega != 1.0 else f"{self.method} eps={self.eps:g}"
        return f"{self.free_steps}+{nudged} {solver} {kind}"


CONFIGS: dict[str, BenchConfig] = {
    "A": BenchConfig("A", (784, 500, 10), 20, 20, 4, 0.5, 1.0, anchor="LA21", anchor_ms=9.5),
    "B": BenchConfig("B", (784, 500, 10), 16, 15, 15, 0.5, 0.5, variant="centered", method="async",
                     anchor="RAIN23", anchor_ms=11.7),
    # ER19's leaky dynamics: logistic rho(s) = sigmoid(4 (s - 1/2)), nudge beta dC/dy unscaled by eps
    "C": BenchConfig("C", (784, 500, 10), 20, 100, 12, 0.2, 0.1, rho="sigmoid4", nudge_scale="none",
                     project=False, repeats=60, anchor="ER19", anchor_ms=43.6),
    "D": BenchConfig("D", (784, 500, 500, 500, 10), 20, 500, 8, 0.5, 1.0, repeats=7),
    # issue 4's GPU budget: config A's phases (one-sided EP, 20 + 4 Euler steps, eps 0.5) on a wider net, batch 256
    "G": BenchConfig("G", (784, 1024, 1024, 10), 256, 20, 4, 0.5, 1.0, repeats=50),
    # issue 6's conv benchmark: configs/mnist-conv.toml's net and phases (centered EP, 30 + 2x8 Euler steps)
    "M": BenchConfig("M", (784, 6272, 3136, 10), 64, 30, 8, 0.5, 0.5, variant="centered", repeats=6,
                     image=(1, 28, 28), conv=("32:5:max", "64:5:max"), gain=0.5),
    # the same net relaxed by the over-relaxed block solver (configs/mnist-conv-async.toml: 8 + 2x3 sweeps)
    "N": BenchConfig("N", (784, 6272, 3136, 10), 64, 8, 3, 0.5, 0.5, variant="centered", method="async", omega=1.5,
                     repeats=10, image=(1, 28, 28), conv=("32:5:max", "64:5:max"), gain=0.5),
}
DEFAULT_CONFIGS = ("A", "B", "C", "D")


def sgemm_shape(device: torch.device) -> tuple[int, int, int]:
    return CUDA_SGEMM_SHAPE if device.type == "cuda" else SGEMM_SHAPE


def small_shapes(configs: Sequence[BenchConfig]) -> list[tuple[int, int, int]]:
    """The batch-sized products the configs really multiply, (m, k, n): those of a dense config's floor
    (:func:`floor_products`), and (batch, n_k, n_k+1) per dense matrix after a conv config's conv layers."""
    shapes = {shape for c in configs if not c.conv for shape, _ in floor_products(c)}
    shapes |= {(c.batch, a, b) for c in configs if c.conv
               for a, b in list(zip(c.sizes[:-1], c.sizes[1:]))[len(c.conv):]}
    return sorted(shapes, key=lambda t: (t[0], -t[1], -t[2]))


# ------------------------------------------------------------------------------------------ FLOP floor
def flop_floor(cfg: BenchConfig) -> float:
    """FLOPs (2 per multiply-add) a lean EP step of ``cfg`` needs: those of :func:`floor_products` (a dense chain),
    or of :func:`conv_flop_floor`."""
    if cfg.conv:
        return conv_flop_floor(cfg)
    return 2.0 * sum(m * k * n * count for (m, k, n), count in floor_products(cfg))


def floor_products(cfg: BenchConfig) -> list[tuple[tuple[int, int, int], int]]:
    """The products a lean EP step of a dense ``cfg`` cannot avoid, as ((m, k, n), how many): x's drive once per
    batch (x is clamped in every phase), both directions of every hidden-hidden or hidden-output matrix per step
    (Euler step or block sweep alike), and the gradient as one fused difference: one product for W_1 (its pre
    side, x, is the same in both phases), two for every other matrix (both of its sides moved)."""
    n, b = cfg.sizes, cfg.batch
    steps = cfg.free_steps + cfg.nudged_phases * cfg.nudge_steps
    products = [((b, n[0], n[1]), 1), ((n[1], b, n[0]), 1)]
    for pre, post in zip(n[1:-1], n[2:]):  # the matrices between free layers
        products += [((b, pre, post), steps), ((b, post, pre), steps), ((post, b, pre), 2)]
    return products


def conv_flop_floor(cfg: BenchConfig) -> float:
    """As :func:`flop_floor` for a conv chain: a conv term costs C_out C_in k^2 MACs per output position (before
    pooling) in each direction; the first term's drive once per batch, the others both ways every step, and
    the gradient one correlation per term and phase pair."""
    from earlyprop.conv import conv_network

    net = conv_network(cfg.image, cfg.conv, [], cfg.sizes[-1], dtype=torch.float32)
    per_term = []
    for term in net.layered_pairs():
        if hasattr(term, "conv_shape"):
            c_out, c_in, k, _ = term.weight.shape
            per_term.append(cfg.batch * c_out * c_in * k * k * term.conv_shape[1] * term.conv_shape[2])
        else:
            per_term.append(cfg.batch * term.weight.numel())
    steps = cfg.free_steps + cfg.nudged_phases * cfg.nudge_steps
    inner = sum(per_term[1:])
    macs = per_term[0] + steps * 2 * inner + (per_term[0] + 2 * inner)
    return 2.0 * macs
