"""Batch-sized products C (+)= A @ B on CPU, compiled by LLVM (llvmlite, which numba brings) for the host's AVX-512.

At a batch of 20, MKL multiplies a 500 x 500 weight matrix at ~100 GFLOP/s on one core of the development VM
(Intel Xeon, AVX-512), against ~150 for a large sgemm, and by a transposed view (x W^T, the input's drive) at
~80. A deep net's long phase (config D of issue 4) spends nearly all its time in such products: each step reads
every weight matrix in both directions, 4 MB for D, more than the core's 2 MB L2, so each product streams its
matrix from L3 while it multiplies. Two products here (IR: :mod:`earlyprop.small_gemm_ir`):

- :class:`PackedMatrix`: B packed in panels once (per training step: ``chain.StepFields``), one register-blocked
  pass per panel and row block, each prefetching the next panel (the next product's first one after the last:
  :func:`link`). D's four
  20 x 500 x 500 products per step: 144-149 GFLOP/s against MKL's 100-101 in the same loop.
- :func:`times_transposed` / :func:`transposed_kernels`: ``a @ W^T`` reading W (the parameter, row-major) in
  place, no packing: x's drive 20 x 784 x 500 in 157 us against MKL's 208 (cache-flushed: 197 against 266).

Numbers: BENCHMARKS.md, 2026-11-28 (20:20-21:20). :func:`available` says whether this machine runs them (llvmlite,
one torch thread, AVX-512, where they were measured); elsewhere, and with ``Relaxation(native=False)``, torch
multiplies. Each shape compiles once per process (0.06-0.4 s).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from earlyprop.small_gemm_ir import MAX_ROWS, TYPES, VECTORS, dot_ir, lanes, panel_ir

try:
    import llvmlite.binding as llvm
except ImportError:  # no native extra: MKL multiplies
    llvm = None

MAX_BATCH = 64  # rows of A: past a few register blocks MKL's own blocking wins (measured here up to 64)
__all__ = ["MAX_BATCH", "MAX_ROWS", "PackedMatrix", "Product", "applies", "available", "installed", "link",
           "times_transposed", "transposed_kernels"]


@functools.cache
def _host() -> tuple[str, str, bool] | None:
    """(cpu name, features, AVX-512 present), or None without llvmlite."""
    if llvm is None:
        return None
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        features = llvm.get_host_cpu_features()
        return llvm.get_host_cpu_name(), features.flatten(), bool(features.get("avx512f", False))
    except RuntimeError:  # a host LLVM cannot describe (llvmlite raises there): treated as absent, MKL multiplies
        return None


def installed() -> bool:
    """Whether llvmlite is installed, so that the products here compile (on any CPU LLVM targets)."""
    return _host() is not None


def available() -> bool:
    """Whether the products here run instead of MKL's: llvmlite installed, an AVX-512 CPU (where they were
    measured faster) and one torch thread (MKL's products use all of them; these, one)."""
    host = _host()
    return host is not None and host[2] and torch.get_num_threads() == 1


def applies(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """Whether ``out (+)= a @ b`` can run as a packed product: CPU float32/float64, ``a`` and ``out`` row-major,
    a batch of at most :data:`MAX_BATCH`, and a matrix wide enough to fill the panels (NR columns and rows)."""
    return a.dtype == b.dtype and fits(a, tuple(b.shape), out)


def fits(a: Tensor, shape: tuple[int, int], out: Tensor) -> bool:
    """:func:`applies` for a right operand of this (k, n) shape and ``a``'s dtype."""
    if not _rows_fit(a, out):
        return False
    (m, k), n = a.shape, shape[1]
    return shape[0] == k and tuple(out.shape) == (m, n) and min(k, n) >= lanes(a.dtype) * VECTORS


def _rows_fit(a: Tensor, out: Tensor) -> bool:
    return (a.device.type == "cpu" and out.device.type == "cpu" and a.dtype in TYPES and a.dtype == out.dtype
            and a.dim() == out.dim() == 2 and a.is_contiguous() and out.is_contiguous()
            and 0 < a.shape[0] <= MAX_BATCH)


class PackedMatrix:
    """B (K x N) packed for products: panels of NR columns, each K x NR contiguous, the last one zero-padded. A copy:
    pack again after B changes. The same packs serve any batch (each batch size compiles its own loop)."""

    def __init__(self, b: Tensor):
        k, n = b.shape
        self.shape, self.dtype = (k, n), b.dtype
        self.nr = nr = lanes(b.dtype) * VECTORS
        full, rest = divmod(n, nr)
        self.data = torch.zeros(full + (rest > 0), k, nr, dtype=b.dtype)
        b = b.detach()
        if full:  # one strided copy per part: the full panels, then the zero-padded last one
            self.data[:full].copy_(b[:, :full * nr].unflatten(1, (full, nr)).transpose(0, 1))
        if rest:
            self.data[full, :, :rest].copy_(b[:, full * nr:])

    def into(self, a: Tensor, out: Tensor, accumulate: bool = False) -> Product:
        """``out = a @ B`` (``out += a @ B`` with ``accumulate``) as a callable bound to these tensors."""
        if a.dtype != self.dtype or not fits(a, self.shape, out):
            raise ValueError(f"no packed product of {tuple(a.shape)} by {self.shape} into {tuple(out.shape)}")
        return Product(self, a, out, accumulate)


class Product:
    """One bound product (see :meth:`PackedMatrix.into`); its last panel prefetches ``args[3]`` (:func:`link`)."""

    def __init__(self, packed: PackedMatrix, a: Tensor, out: Tensor, accumulate: bool):
        self.packed, self.tensors = packed, (packed, a, out)  # kept alive: the call holds their addresses
        self.kernel = _kernels(panel_ir, a.shape[0], *packed.shape, a.dtype)[accumulate]
        self.args = [a.data_ptr(), packed.data.data_ptr(), out.data_ptr(), packed.data.data_ptr()]

    def __call__(self) -> None:
        self.kernel(*self.args)

    def prefetch(self, packed: PackedMatrix) -> None:
        self.tensors = (*self.tensors[:3], packed)
        self.args[3] = packed.data.data_ptr()


def link(products: list) -> None:
    """Point each :class:`Product` of a step's calls at the packed matrix of the next one (cyclically: the last
    one's next is the next step's first), so its last panel prefetches that."""
    chain = [p for p in products if isinstance(p, Product)]
    for here, after in zip(chain, chain[1:] + chain[:1]):
        here.prefetch(after.packed)


def times_transposed(a: Tensor, w: Tensor, out: Tensor, accumulate: bool = False) -> bool:
    """``out = a @ w.T`` (``+=`` with ``accumulate``) reading ``w`` (n x k, row-major) in place, where it applies
    (:func:`transposed_kernels`, CPU, row-major operands): True, else False and nothing is written (then torch
    multiplies)."""
    kernels = transposed_kernels(*a.shape, w.shape[0], a.dtype) if a.dim() == w.dim() == 2 else None
    if (kernels is None or not _rows_fit(a, out) or w.dtype != a.dtype or not w.is_contiguous()
            or w.shape[1] != a.shape[1] or tuple(out.shape) != (a.shape[0], w.shape[0]) or w.device != a.device):
        return False
    kernels[accumulate](a.data_ptr(), w.data_ptr(), out.data_ptr())
    return True


def transposed_kernels(m: int, k: int, n: int, dtype: torch.dtype) -> tuple | None:
    """(mm, addmm), each ``kernel(a_ptr, w_ptr, out_ptr)``: ``out (m x n) = / += a (m x k) @ w.T`` for row-major
    operands (w: n x k), where they run (:func:`available`, at most :data:`MAX_BATCH` rows, float32/float64);
    else None. For a caller whose operands' layout is fixed (checked once); :func:`times_transposed` checks."""
    if not (available() and 0 < m <= MAX_BATCH and dtype in TYPES and k > 0 and n > 0):
        return None
    return _kernels(dot_ir, m, k, n, dtype)[:2]


@functools.cache
def _kernels(ir, m: int, k: int, n: int, dtype: torch.dtype) -> tuple:
    """(mm, addmm, engine) of ``ir(m, k, n, dtype)``, compiled once per process and shape for this CPU."""
    host = _host()
    if host is None:
        raise RuntimeError("earlyprop.small_gemm needs llvmlite (pip install earlyprop[native])")
    cpu, features, _ = host
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
    module = llvm.parse_assembly(ir(m, k, n, dtype))
    module.verify()
    passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(module, passes)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    pointers = [ctypes.c_void_p] * (4 if ir is panel_ir else 3)
    signature = ctypes.CFUNCTYPE(None, *pointers)
    mm, addmm = (signature(engine.get_function_address(name)) for name in ("mm", "addmm"))
    return mm, addmm, engine  # (the engine owns the code: kept with it)
