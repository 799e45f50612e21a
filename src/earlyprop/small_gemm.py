"""Batch-sized products C (+)= A @ B on CPU, compiled by LLVM (llvmlite, which numba brings) for the host's AVX-512.

At a batch of 20, MKL multiplies a 500 x 500 weight matrix at ~100 GFLOP/s on one core of the development VM
(Intel Xeon, AVX-512), against ~150 for a large sgemm: a deep net's long phase (config D of issue 4) spends
nearly all its time there. Each step reads every weight matrix in both directions, 4 MB for D, more than the
core's 2 MB L2, so each product streams its matrix from L3 while it multiplies. Here a product is one
register-blocked loop per panel of ``NR`` columns of B (packed contiguous once per phase), the batch split into
row blocks of up to ``MAX_ROWS``, and each panel's pass prefetches the next panel (or the next product's first
one) into L2: D's four 20 x 500 x 500 products per step run at 135-145 GFLOP/s instead of MKL's 94-101
(BENCHMARKS.md, 2026-11-28 20:30-).

:class:`PackedMatrix` is B packed for one batch size; calling it as ``packed.into(a, out, accumulate)`` gives the
product as a callable bound to its tensors (:class:`Product`); :func:`link` tells each product of a step which
matrix comes next, for the prefetch. :func:`available` says whether this machine runs them (llvmlite, one torch
thread, AVX-512).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

try:
    import llvmlite.binding as llvm
except ImportError:  # no native extra: MKL multiplies
    llvm = None

MAX_ROWS = 14  # rows of A per register block: 2 x MAX_ROWS accumulators of 32 in the 512-bit registers
VECTORS = 2  # vectors of B per row of a block: NR = 2 x 16 floats or 2 x 8 doubles
MAX_BATCH = 64  # past a few row blocks, MKL's own blocking wins (not measured here beyond D's batch of 20)
_TYPES = {torch.float32: ("float", 4, "f32"), torch.float64: ("double", 8, "f64")}


@functools.cache
def _host() -> tuple[str, str, bool] | None:
    """(cpu name, features, AVX-512 present), or None without llvmlite."""
    if llvm is None:
        return None
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    features = llvm.get_host_cpu_features()
    return llvm.get_host_cpu_name(), features.flatten(), bool(features.get("avx512f", False))


def installed() -> bool:
    """Whether llvmlite is installed, so that the products here compile (on any CPU LLVM targets)."""
    return _host() is not None


def available() -> bool:
    """Whether the products here run instead of MKL's: llvmlite installed, an AVX-512 CPU (where they were
    measured faster) and one torch thread (MKL's products use all of them; these, one)."""
    host = _host()
    return host is not None and host[2] and torch.get_num_threads() == 1


def applies(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """Whether ``out (+)= a @ b`` can run here: CPU float32/float64, ``a`` and ``out`` row-major, a batch of at
    most :data:`MAX_BATCH`, and a matrix wide enough to fill the panels (at least NR columns and rows)."""
    return a.dtype == b.dtype and fits(a, tuple(b.shape), out)


def fits(a: Tensor, shape: tuple[int, int], out: Tensor) -> bool:
    """:func:`applies` for a right operand of this (k, n) shape and ``a``'s dtype."""
    if a.device.type != "cpu" or out.device.type != "cpu" or a.dtype not in _TYPES or a.dtype != out.dtype:
        return False
    (m, k), n = a.shape, shape[1]
    return (a.is_contiguous() and out.is_contiguous() and shape[0] == k and tuple(out.shape) == (m, n)
            and 0 < m <= MAX_BATCH and min(k, n) >= _lanes(a.dtype) * VECTORS)


def _lanes(dtype: torch.dtype) -> int:
    return 64 // _TYPES[dtype][1]


def _row_blocks(m: int) -> list[tuple[int, int]]:
    """(first row, rows) of each block: as few blocks as MAX_ROWS allows, of balanced sizes (20 -> 10 + 10)."""
    count = -(-m // MAX_ROWS)
    sizes = [m // count + (i < m % count) for i in range(count)]
    return [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]


class PackedMatrix:
    """B (K x N) packed for products with a batch of ``batch`` rows: panels of NR columns, each K x NR contiguous,
    the last one zero-padded. A copy: pack again after B changes."""

    def __init__(self, b: Tensor, batch: int):
        k, n = b.shape
        self.shape, self.dtype, self.batch = (k, n), b.dtype, batch
        self.nr = nr = _lanes(b.dtype) * VECTORS
        full, rest = divmod(n, nr)
        self.data = torch.zeros(full + (rest > 0), k, nr, dtype=b.dtype)
        b = b.detach()
        if full:  # one strided copy per part: the full panels, then the zero-padded last one
            self.data[:full].copy_(b[:, :full * nr].unflatten(1, (full, nr)).transpose(0, 1))
        if rest:
            self.data[full, :, :rest].copy_(b[:, full * nr:])
        self.kernels = _kernels(batch, k, n, b.dtype)

    def into(self, a: Tensor, out: Tensor, accumulate: bool = False) -> Product:
        """``out = a @ B`` (``out += a @ B`` with ``accumulate``) as a callable bound to these tensors."""
        if a.dtype != self.dtype or not fits(a, self.shape, out) or a.shape[0] != self.batch:
            raise ValueError(f"no packed product of {tuple(a.shape)} by {self.shape} into {tuple(out.shape)}")
        return Product(self, a, out, accumulate)


class Product:
    """One bound product (see :meth:`PackedMatrix.into`); ``next``: the packed matrix read after this one."""

    def __init__(self, packed: PackedMatrix, a: Tensor, out: Tensor, accumulate: bool):
        self.tensors = (packed, a, out)  # kept alive: the call holds their addresses
        self.kernel = packed.kernels[accumulate]
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
        here.prefetch(after.tensors[0])


@functools.cache
def _kernels(m: int, k: int, n: int, dtype: torch.dtype) -> tuple:
    """(mm, addmm) for an (m x k) by packed (k x n) product, compiled once per process and shape."""
    host = _host()
    if host is None:
        raise RuntimeError("earlyprop.small_gemm needs llvmlite (pip install earlyprop[native])")
    cpu, features, _ = host
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
    module = llvm.parse_assembly(product_ir(m, k, n, dtype))
    module.verify()
    passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(module, passes)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    signature = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    mm, addmm = (signature(engine.get_function_address(name)) for name in ("mm", "addmm"))
    return mm, addmm, engine  # (the engine owns the code: kept with it)


def product_ir(m: int, k: int, n: int, dtype: torch.dtype) -> str:
    """LLVM IR of ``mm(A, B, C, next)`` and ``addmm(...)``: C (m x n, row-major) = / += A (m x k, row-major) times
    B packed (:class:`PackedMatrix`), panel by panel and row block by row block, each panel's passes prefetching
    the next panel (the last one, ``next``'s first) into L2."""
    t, size, suffix = _TYPES[dtype]
    lanes = 64 // size
    nr, panels, blocks = lanes * VECTORS, -(-n // (lanes * VECTORS)), _row_blocks(m)
    # per k of one pass, the share of the next panel it prefetches: whole cache lines, the passes covering it
    ahead = -(-nr // len(blocks) // lanes) * lanes
    vec = f"<{lanes} x {t}>"
    lines = [f"declare {vec} @llvm.fma.v{lanes}{suffix}({vec}, {vec}, {vec})",
             f"declare void @llvm.masked.store.v{lanes}{suffix}.p0({vec}, ptr, i32, <{lanes} x i1>)",
             f"declare {vec} @llvm.masked.load.v{lanes}{suffix}.p0(ptr, i32, <{lanes} x i1>, {vec})",
             "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
    shapes = sorted({(rows, min(nr, n - p * nr)) for _, rows in blocks for p in range(panels)})
    for accumulate in (False, True):
        for rows, width in shapes:
            lines += _tile_ir(t, size, suffix, lanes, k, n, rows, width, accumulate, ahead)
        name = "addmm" if accumulate else "mm"
        lines += [f"define void @{name}(ptr noalias %A, ptr noalias %B, ptr noalias %C, ptr %NEXT) nounwind {{",
                  "entry:"]
        for p in range(panels):
            width = min(nr, n - p * nr)
            for b, (first, rows) in enumerate(blocks):
                at = f"{p}_{b}"
                source, offset = ("%B", (p + 1) * k * nr) if p + 1 < panels else ("%NEXT", 0)
                lines += [f"  %a{at} = getelementptr inbounds {t}, ptr %A, i64 {first * k}",
                          f"  %b{at} = getelementptr inbounds {t}, ptr %B, i64 {p * k * nr}",
                          f"  %c{at} = getelementptr inbounds {t}, ptr %C, i64 {first * n + p * nr}",
                          f"  %f{at} = getelementptr inbounds {t}, ptr {source}, i64 {offset + b * k * ahead}",
                          f"  call void @tile_{rows}_{width}_{int(accumulate)}(ptr %a{at}, ptr %b{at}, ptr %c{at}, "
                          f"ptr %f{at})"]
        lines += ["  ret void", "}"]
    return "\n".join(lines)


def _tile_ir(t: str, size: int, suffix: str, lanes: int, k: int, n: int, rows: int, width: int, accumulate: bool,
             ahead: int) -> list[str]:
    """One register block: ``rows`` rows of C by ``width`` columns (one panel), over all of k; each k also
    prefetches ``ahead`` elements of what comes next (``%pf``)."""
    vec, nr = f"<{lanes} x {t}>", lanes * VECTORS
    fma, masked = f"@llvm.fma.v{lanes}{suffix}", f"v{lanes}{suffix}.p0"
    vectors = -(-width // lanes)

    def mask(v: int) -> str | None:  # lanes of vector v inside the panel's width, None when all are
        valid = min(lanes, width - v * lanes)
        return None if valid == lanes else "<" + ", ".join(f"i1 {int(j < valid)}" for j in range(lanes)) + ">"

    body = [f"define internal void @tile_{rows}_{width}_{int(accumulate)}(ptr noalias %a, ptr noalias %b, "
            "ptr noalias %c, ptr %pf) alwaysinline nounwind {", "entry:"]
    for i in range(rows):
        for v in range(vectors):
            body.append(f"  %cp{i}_{v} = getelementptr inbounds {t}, ptr %c, i64 {i * n + v * lanes}")
            if accumulate:
                load = (f"load {vec}, ptr %cp{i}_{v}, align {size}" if mask(v) is None else
                        f"call {vec} @llvm.masked.load.{masked}(ptr %cp{i}_{v}, i32 {size}, <{lanes} x i1> {mask(v)}, "
                        f"{vec} zeroinitializer)")
                body.append(f"  %init{i}_{v} = {load}")
    body += ["  br label %loop", "loop:", "  %k = phi i64 [0, %entry], [%k1, %loop]"]
    for i in range(rows):
        for v in range(vectors):
            start = f"%init{i}_{v}" if accumulate else "zeroinitializer"
            body.append(f"  %acc{i}_{v} = phi {vec} [{start}, %entry], [%new{i}_{v}, %loop]")
    body += [f"  %bo = mul i64 %k, {nr}", f"  %bp = getelementptr inbounds {t}, ptr %b, i64 %bo"]
    for v in range(vectors):
        body += [f"  %bp{v} = getelementptr inbounds {t}, ptr %bp, i64 {v * lanes}",
                 f"  %bv{v} = load {vec}, ptr %bp{v}, align {size}"]
    for i in range(rows):
        body += [f"  %ao{i} = add i64 %k, {i * k}", f"  %ap{i} = getelementptr inbounds {t}, ptr %a, i64 %ao{i}",
                 f"  %as{i} = load {t}, ptr %ap{i}, align {size}",
                 f"  %ai{i} = insertelement {vec} poison, {t} %as{i}, i32 0",
                 f"  %ab{i} = shufflevector {vec} %ai{i}, {vec} poison, <{lanes} x i32> zeroinitializer"]
        body += [f"  %new{i}_{v} = call {vec} {fma}({vec} %ab{i}, {vec} %bv{v}, {vec} %acc{i}_{v})"
                 for v in range(vectors)]
    body += [f"  %po = mul i64 %k, {ahead}", f"  %pp = getelementptr inbounds {t}, ptr %pf, i64 %po"]
    for line in range(ahead // lanes):  # one prefetch per cache line: read, into L2, data
        body += [f"  %pl{line} = getelementptr inbounds {t}, ptr %pp, i64 {line * lanes}",
                 f"  call void @llvm.prefetch.p0(ptr %pl{line}, i32 0, i32 2, i32 1)"]
    body += ["  %k1 = add nuw nsw i64 %k, 1", f"  %done = icmp eq i64 %k1, {k}",
             "  br i1 %done, label %exit, label %loop", "exit:"]
    for i in range(rows):
        for v in range(vectors):
            body.append(f"  store {vec} %new{i}_{v}, ptr %cp{i}_{v}, align {size}" if mask(v) is None else
                        f"  call void @llvm.masked.store.{masked}({vec} %new{i}_{v}, ptr %cp{i}_{v}, i32 {size}, "
                        f"<{lanes} x i1> {mask(v)})")
    return [*body, "  ret void", "}"]
