"""What a lean chain (:class:`earlyprop.chain.Chain`) takes from its network alone: whether the network is a plain
layered chain (:func:`dense_chain`), and the flat buffer's layout, the rates' flags and the compiled kernels' arrays
for one batch size (:class:`ChainLayout`, kept in ``network.memo``)."""

from __future__ import annotations

import torch
from torch import Tensor

from earlyprop import cuda_graphs, small_gemm
from earlyprop import native as native_kernels
from earlyprop.interactions import Dense
from earlyprop.native_chain import KernelLayout, fits
from earlyprop.network import Network
from earlyprop.nonlinearity import HardSigmoid, Linear

# On CPU a layer this narrow (a class output) is stored unit-major, (n_k, batch) in memory: its field, a
# (batch, n_k) product with a long inner dimension, runs 1.1-3x faster into that transposed output (MKL, one
# thread: 18.6 -> 16.4 us for 20 x 500 x 10 with the neighbour's product, 64.5 -> 34.0 us at batch 64),
# while at 50 units and more the row-major layout is as fast or faster (BENCHMARKS.md, 2026-11-28).
UNIT_MAJOR_WIDTH = 16


class ChainLayout:
    """What a :class:`earlyprop.chain.Chain` of one network takes from the network alone, for one batch size, dtype
    and device: the rates' flags, the flat buffer's layout and, where the compiled kernels run, their arrays.

    Made once and kept in ``network.memo`` (:meth:`of`), so that a phase only allocates and fills its buffers:
    building these took ~100 us of Python per phase on the development VM, as much as the 4 steps of a nudged
    phase. The key holds what they depend on: the weights' identity and storage (an optimizer's in-place update
    keeps both; replacing a parameter or moving the network changes them), the rates' identity and attributes,
    the batch size, the kernels' switch and availability (numba's, small_gemm's), torch's thread count
    (:func:`earlyprop.native_chain.fits`) and :data:`UNIT_MAJOR_WIDTH`.
    """

    MAX_KEPT = 8  # layouts per network (batch sizes x dtypes x devices x switches): the oldest goes first

    def __init__(self, network: Network, weights: list[Tensor], batch: int, native: bool):
        self.n = n = len(weights)
        self.w: list = [None, *weights]  # w[k] couples layer k-1 (pre) and k (post), shape (n_k, n_{k-1})
        self.rhos, self.sizes = rhos, sizes = network.rhos, network.sizes
        self.dtype, self.device = weights[0].dtype, weights[0].device
        self.bounds = [rho.bounds for rho in rhos]
        self.plain = [type(rho) is Linear for rho in rhos]  # the phase's start: hard sigmoids join when clipped
        self.hard = [_is_unit_hard_sigmoid(rho) for rho in rhos]
        self.uniform = all(_same_rho(rhos[k], rhos[1]) for k in range(2, n + 1))
        cpu = self.device.type == "cpu"
        compiled = native and fits(rhos, sizes, weights, batch)  # they read layers row-major
        self.unit_major = [False, *(cpu and not compiled and sizes[k] <= UNIT_MAJOR_WIDTH for k in range(1, n + 1))]
        start, self.span = 0, {}
        for k in [*range(2, n + 1, 2), *range(1, n + 1, 2)]:
            self.span[k] = (start, start + batch * sizes[k])
            start = self.span[k][1]
        self.batch, self.length = batch, start
        self.scalars: dict[float, Tensor] = {}  # 0-d constants on the device (Chain.scalar), never written
        self.kernels = KernelLayout(self, batch) if compiled else None
        # the torch loops' update in one compiled pass where the kernels may run but the chain's products are past them
        self.fused_update = (cpu and native and native_kernels.available() and not compiled
                             and self.dtype in (torch.float32, torch.float64))
        # the torch loops' products by earlyprop.small_gemm in long phases (native=False: torch's alone)
        self.packed_products = cpu and native and small_gemm.available()
        self.step_plans: dict = {}  # earlyprop.step_plan's, for the rules that run their step on this layout
        self._graphs: tuple | None = None  # (StepGraphs, PhaseBuffers) of the chains in graph mode, made on first use

    def step_graphs(self) -> cuda_graphs.StepGraphs | None:
        """The CUDA graphs of this layout's chains (None off CUDA, where ``cuda_graphs`` has no effect)."""
        if self._graphs is None:
            self._graphs = (cuda_graphs.step_graphs_for(self.device), cuda_graphs.PhaseBuffers())
        return self._graphs[0]

    def phase_buffers(self) -> cuda_graphs.PhaseBuffers:
        """The buffers a chain in graph mode keeps from phase to phase."""
        self.step_graphs()
        return self._graphs[1]

    def views(self, flat: Tensor) -> list:
        """Per-layer (batch, n_k) views of a flat buffer of this layout: row-major, or unit-major for the narrow
        layers (:data:`UNIT_MAJOR_WIDTH`); None for the input."""
        batch = self.batch  # as_strided: one view op per layer instead of a slice and a view
        return [None, *(flat.as_strided((batch, self.sizes[k]), (1, batch) if self.unit_major[k] else
                                        (self.sizes[k], 1), flat.storage_offset() + self.span[k][0])
                        for k in range(1, self.n + 1))]

    @staticmethod
    def of(network: Network, weights: list[Tensor], batch: int, native: bool) -> ChainLayout:
        """The network's layout for a batch, from its memo, made on first use (or every time when a weight is not
        contiguous: the kernels would read a copy of it, which an in-place update would leave behind)."""
        try:
            key = ("chain", batch, native, native_kernels.available(), small_gemm.available(), UNIT_MAJOR_WIDTH,
                   torch.get_num_threads(),
                   *((id(w), w.data_ptr()) for w in weights),
                   *((id(rho), *vars(rho).values()) for rho in network.rhos))
            hash(key)
        except TypeError:  # a rate with an unhashable attribute: no memo
            key = None
        memo = getattr(network, "memo", None)
        if key is None or memo is None or not all(w.is_contiguous() for w in weights):
            return ChainLayout(network, weights, batch, native)
        layout = memo.get(key)
        if layout is None:
            while len(memo) >= ChainLayout.MAX_KEPT:
                del memo[next(iter(memo))]
            layout = memo[key] = ChainLayout(network, weights, batch, native)
        return layout


def dense_chain(network: Network) -> list[Tensor] | None:
    """W_1 .. W_n of a plain layered chain x - h_1 - ... - h_n (layer 0 the only clamped one, the last one driven,
    one ``Dense`` term per consecutive pair and nothing else), or None for any other network."""
    n = len(network.sizes) - 1
    if network.clamped != (0,) or network.driven != n or len(network.interactions) != n:
        return None
    weights: list = [None] * n
    for term in network.interactions:
        if type(term) is not Dense or term.pre != term.post - 1:  # subclasses may change the field
            return None
        weights[term.pre] = term.weight
    return None if any(w is None for w in weights) else weights


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is active for this device type (``--amp``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no argument, CUDA only (CPU has its own query)
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _is_unit_hard_sigmoid(rho) -> bool:
    return type(rho) is HardSigmoid and rho.bounds == (0.0, 1.0)


def _same_rho(a, b) -> bool:
    return type(a) is type(b) and vars(a) == vars(b)
