"""Convolutional interaction terms and convolutional energy networks (LA21/SC23 DCHN; issue 6).

A layer's state stays a flat (batch, C*H*W) tensor, so the relaxation loop, the rules, checkpoints and
the trainer treat a convolutional network like any other; the term reshapes rates to images itself.

The term couples a pre layer (C_in, H, W) and a post layer (C_out, H', W') through one kernel K::

    E = -rho(s_post) . pool(conv(rho(s_pre), K))                                   (DCHN energy)

With average pooling (or none) the term is bilinear, so its fields are the exact partial gradients:
the post layer sees pool(conv(rho_pre)), the pre layer the exact transpose conv^T(pool^T(rho_post))
(``conv_transpose2d`` with the same kernel, and nearest-neighbour upsampling / p^2). With max pooling
the term is piecewise bilinear: the pre layer's field routes rho_post back through the argmax of the
current conv(rho_pre) (max-unpooling), which is the gradient almost everywhere, so the energy identity
R - s = -dE/ds (T1), early inference (T4) and the GDU property (T9) still hold (tests/theory).
Convolutions have stride 1; the post layer's biases are the network's per-unit biases.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyprop.interactions import Coupling, Dense, glorot_uniform
from earlyprop.network import Network
from earlyprop.nonlinearity import Nonlinearity

POOLS = ("max", "avg", "none")


class ConvPool(Coupling):
    """E = -rho(s_post) . pool(conv(rho(s_pre), K)), K of shape (C_out, C_in, k, k), stride 1.

    ``in_shape`` is the pre layer's (C, H, W); ``pool`` is ``"max"``, ``"avg"`` or ``"none"`` with window
    and stride ``pool_size``. ``out_shape`` is the post layer's (C_out, H', W').
    """

    def __init__(self, pre: int, post: int, in_shape: Sequence[int], out_channels: int, kernel_size: int,
                 padding: int | None = None, pool: str = "max", pool_size: int = 2, weight: Tensor | None = None):
        super().__init__()
        if pre == post:
            raise ValueError("ConvPool couples two different layers")
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (channels, height, width) of positive sizes, got {tuple(in_shape)}")
        if kernel_size < 1 or out_channels < 1 or pool_size < 1:
            raise ValueError("kernel_size, out_channels and pool_size must be >= 1")
        self.pre, self.post, self.layers = pre, post, (pre, post)
        self.in_shape = tuple(int(v) for v in in_shape)
        self.padding = kernel_size // 2 if padding is None else int(padding)
        self.pool, self.pool_size = pool, (1 if pool == "none" else int(pool_size))
        c, h, w = self.in_shape
        self.conv_shape = (int(out_channels), h + 2 * self.padding - kernel_size + 1,
                           w + 2 * self.padding - kernel_size + 1)
        if min(self.conv_shape[1:]) < self.pool_size:
            raise ValueError(f"a {kernel_size}x{kernel_size} kernel with padding {self.padding} on a {h}x{w} input "
                             f"leaves {self.conv_shape[1]}x{self.conv_shape[2]}: too small to pool by {self.pool_size}")
        self.out_shape = (self.conv_shape[0], self.conv_shape[1] // self.pool_size,
                          self.conv_shape[2] // self.pool_size)
        shape = (out_channels, c, kernel_size, kernel_size)
        if weight is None:
            weight = torch.zeros(shape, dtype=torch.float64)
        if tuple(weight.shape) != shape:
            raise ValueError(f"kernel of interaction {pre}->{post} has shape {tuple(weight.shape)}, expected {shape}")
        self.weight = nn.Parameter(weight.clone())
        self._last: tuple | None = None  # see _pooled_conv

    @property
    def n_pre(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_post(self) -> int:
        return math.prod(self.out_shape)

    # ------------------------------------------------------------------ forward and exact transpose
    def _conv(self, r_pre: Tensor) -> Tensor:
        return F.conv2d(r_pre.reshape(-1, *self.in_shape), self.weight, padding=self.padding)

    def _pool(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """pool(z) and, for max pooling, the argmax indices the transpose routes through."""
        if self.pool == "max":
            return F.max_pool2d(z, self.pool_size, return_indices=True)
        if self.pool == "avg":
            return F.avg_pool2d(z, self.pool_size), None
        return z, None

    def _pool_transpose(self, g: Tensor, indices: Tensor | None) -> Tensor:
        """pool^T: (batch, C_out, H', W') -> (batch, C_out, conv H, conv W); rows a floor-pool drops get 0."""
        p, size = self.pool_size, self.conv_shape[1:]
        if self.pool == "max":
            return F.max_unpool2d(g, indices, p, output_size=size)
        if self.pool == "none":
            return g
        up = g.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3) / (p * p)
        return F.pad(up, (0, size[1] - up.shape[3], 0, size[0] - up.shape[2]))

    def _conv_transpose(self, g: Tensor) -> Tensor:
        return F.conv_transpose2d(g, self.weight, padding=self.padding)

    def _pooled_conv(self, r_pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """pool(conv(r_pre)) and its argmax indices, the last result reused while ``r_pre`` (the same tensor,
        not modified since) and the kernel are unchanged. A block-solver sweep asks twice for the same rates:
        for the post layer's field, then for the argmax the pre layer's field routes through; this halves the
        convolutions of a max-pool chain's sweep. Only outside autograd (no graph is ever kept)."""
        if torch.is_grad_enabled() or r_pre.is_inference():
            self._last = None
            return self._pool(self._conv(r_pre))
        key = (r_pre._version, self.weight._version)
        last = self._last
        if last is not None and last[0] is r_pre and last[1] == key:
            return last[2], last[3]
        pooled, indices = self._pool(self._conv(r_pre))
        self._last = (r_pre, key, pooled, indices)
        return pooled, indices

    def _indices(self, r_pre: Tensor) -> Tensor | None:
        return self._pooled_conv(r_pre)[1] if self.pool == "max" else None

    def _image(self, r_post: Tensor) -> Tensor:
        return r_post.reshape(-1, *self.out_shape)

    # ------------------------------------------------------------------ Interaction API
    def feedforward(self, r_pre: Tensor) -> Tensor:
        return self._pool(self._conv(r_pre))[0].flatten(1)

    def energy(self, rates: list[Tensor]) -> Tensor:
        return -(self.feedforward(rates[self.pre]) * rates[self.post]).sum(-1)

    def fields(self, rates: list[Tensor], targets: Collection[int] | None = None) -> dict[int, Tensor]:
        out, indices = {}, None
        want_post = targets is None or self.post in targets
        want_pre = targets is None or self.pre in targets
        if want_post or (want_pre and self.pool == "max"):
            pooled, indices = self._pooled_conv(rates[self.pre])
            if want_post:
                out[self.post] = pooled.flatten(1)
        if want_pre:
            back = self._pool_transpose(self._image(rates[self.post]), indices)
            out[self.pre] = self._conv_transpose(back).flatten(1)
        return out

    def param_grads(self, rates: list[Tensor], weights: Tensor | None = None) -> list[Tensor]:
        r_pre, r_post = rates[self.pre], rates[self.post]
        if weights is not None:
            r_post = r_post * weights[:, None]
        back = self._pool_transpose(self._image(r_post), self._indices(r_pre))
        image = r_pre.reshape(-1, *self.in_shape)
        grad = torch.nn.grad.conv2d_weight(image, self.weight.shape, back, padding=self.padding)
        return [-grad / r_pre.shape[0]]

    def extra_repr(self) -> str:
        k = self.weight.shape[-1]
        return (f"pre={self.pre}, post={self.post}, {self.in_shape} -> {self.out_shape}, kernel={k}, "
                f"padding={self.padding}, pool={self.pool}")


# --------------------------------------------------------------------------------- building conv nets
@dataclass(frozen=True)
class ConvSpec:
    """One convolutional layer of a network: ``channels:kernel[:pool[:padding]]``, e.g. ``32:5:max``."""

    channels: int
    kernel: int
    pool: str = "max"
    padding: int | None = None

    @classmethod
    def parse(cls, text: str) -> ConvSpec:
        parts = [p.strip() for p in text.split(":")]
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError
            channels, kernel = int(parts[0]), int(parts[1])
            pool = parts[2] if len(parts) > 2 else "max"
            padding = int(parts[3]) if len(parts) > 3 else None
        except ValueError:
            raise ValueError(f"bad conv layer {text!r}: expected channels:kernel[:pool[:padding]], "
                             "e.g. 32:5:max or 64:3:avg:1") from None
        if channels < 1 or kernel < 1 or (padding is not None and padding < 0) or pool not in POOLS:
            raise ValueError(f"bad conv layer {text!r}: channels and kernel >= 1, padding >= 0, "
                             f"pool one of {', '.join(POOLS)}")
        return cls(channels, kernel, pool, padding)


def parse_conv_specs(text: str | Sequence[str] | None) -> list[ConvSpec]:
    """``"32:5:max,64:5:max"`` (or a list of such items) -> ConvSpecs; empty for None or ``""``."""
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [ConvSpec.parse(item) for item in items if item.strip()]


def conv_network(
    input_shape: Sequence[int],
    conv: Sequence[ConvSpec | str],
    hidden: Sequence[int],
    n_out: int,
    rho: Nonlinearity | str = "hard_sigmoid",
    *,
    input_rho: Nonlinearity | str | None = None,
    output_rho: Nonlinearity | str | None = None,
    gain: float = 1.0,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> Network:
    """The chain image -> conv-pool layers -> dense hidden layers -> output (LA21/ER19 conv nets).

    Kernels and dense weights start Glorot-uniform (fan-in C_in k^2, fan-out C_out k^2 for a kernel),
    times ``gain``.
    """
    specs = [s if isinstance(s, ConvSpec) else ConvSpec.parse(s) for s in conv]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape, sizes, terms = tuple(int(v) for v in input_shape), [math.prod(input_shape)], []
    for spec in specs:
        k = spec.kernel
        fan_in, fan_out = shape[0] * k * k, spec.channels * k * k
        bound = math.sqrt(6.0 / (fan_in + fan_out)) * gain
        kernel = (torch.rand(spec.channels, shape[0], k, k, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        term = ConvPool(len(sizes) - 1, len(sizes), shape, spec.channels, k, spec.padding, spec.pool, weight=kernel)
        terms.append(term)
        shape = term.out_shape
        sizes.append(term.n_post)
    for n in [*hidden, n_out]:
        w = glorot_uniform(n, sizes[-1], gen) * gain
        terms.append(Dense(len(sizes) - 1, len(sizes), sizes[-1], n, w))
        sizes.append(n)
    rhos: list[Nonlinearity | str] = [rho] * len(sizes)
    rhos[0] = input_rho if input_rho is not None else rho
    rhos[-1] = output_rho if output_rho is not None else rho
    return Network(sizes, terms, rhos).to(dtype)
