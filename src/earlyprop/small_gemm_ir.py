"""The LLVM IR of :mod:`earlyprop.small_gemm`'s products, generated for one shape and dtype: 512-bit vectors
(16 floats or 8 doubles), every loop bound a constant.

- :func:`panel_ir`: C (m x n) = / += A (m x k) @ B, B packed in panels of NR = 2 vectors of columns, each K x NR
  contiguous; one register block of up to :data:`MAX_ROWS` rows x NR columns per panel, each pass prefetching
  its share of the next panel (of the ``next`` matrix after the last one) into L2.
- :func:`dot_ir`: C = / += A (m x k) @ W^T with W (n x k) read row-major in place: blocks of 4 rows of A x 4 rows
  of W accumulate 16 vectors of partial dot products along k, then one tree of shuffles and adds sums 16 of them
  at once (15 adds, against 4 per dot for one horizontal sum each).

Both read A row-major (lda = k) and write C row-major (ldc = n).
"""

from __future__ import annotations

import torch

MAX_ROWS = 14  # rows of A per panel block: 2 x MAX_ROWS accumulators of the 32 512-bit registers
VECTORS = 2  # vectors of B per row of a panel block: NR = 2 x 16 floats or 2 x 8 doubles
DOT_ROWS = DOT_COLS = 4  # a dot block: 4 rows of A x 4 rows of W, 16 accumulators
TYPES = {torch.float32: ("float", 4, "f32"), torch.float64: ("double", 8, "f64")}


def lanes(dtype: torch.dtype) -> int:
    return 64 // TYPES[dtype][1]


def row_blocks(m: int, most: int) -> list[tuple[int, int]]:
    """(first row, rows) of as few blocks of at most ``most`` rows as cover m, of balanced sizes (20 -> 10 + 10)."""
    count = -(-m // most)
    sizes = [m // count + (i < m % count) for i in range(count)]
    return [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]


class _Types:
    """The IR names of one dtype's scalar, vector and intrinsics."""

    def __init__(self, dtype: torch.dtype):
        self.t, self.size, suffix = TYPES[dtype]
        self.lanes = lanes(dtype)
        self.vec = f"<{self.lanes} x {self.t}>"
        self.fma = f"@llvm.fma.v{self.lanes}{suffix}"
        self.load = f"@llvm.masked.load.v{self.lanes}{suffix}.p0"
        self.store = f"@llvm.masked.store.v{self.lanes}{suffix}.p0"
        self.declarations = [f"declare {self.vec} {self.fma}({self.vec}, {self.vec}, {self.vec})",
                             f"declare void {self.store}({self.vec}, ptr, i32, <{self.lanes} x i1>)",
                             f"declare {self.vec} {self.load}(ptr, i32, <{self.lanes} x i1>, {self.vec})",
                             "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]

    def mask(self, valid: int) -> str:
        return "<" + ", ".join(f"i1 {int(j < valid)}" for j in range(self.lanes)) + ">"

    def gep(self, name: str, base: str, offset) -> str:
        return f"  {name} = getelementptr inbounds {self.t}, ptr {base}, i64 {offset}"

    def vector_load(self, name: str, at: str, valid: int) -> str:
        """A vector from ``at``: its first ``valid`` lanes (the rest zero) when fewer than all."""
        if valid >= self.lanes:
            return f"  {name} = load {self.vec}, ptr {at}, align {self.size}"
        return (f"  {name} = call {self.vec} {self.load}(ptr {at}, i32 {self.size}, <{self.lanes} x i1> "
                f"{self.mask(valid)}, {self.vec} zeroinitializer)")

    def broadcast(self, name: str, at: str) -> list[str]:
        return [f"  {name}s = load {self.t}, ptr {at}, align {self.size}",
                f"  {name}i = insertelement {self.vec} poison, {self.t} {name}s, i32 0",
                f"  {name} = shufflevector {self.vec} {name}i, {self.vec} poison, <{self.lanes} x i32> zeroinitializer"]


# ------------------------------------------------------------------------------------------- panel form
def panel_ir(m: int, k: int, n: int, dtype: torch.dtype) -> str:
    """``mm(A, B, C, next)`` and ``addmm(...)``: C = / += A times B packed (see the module's docstring)."""
    ty = _Types(dtype)
    nr, blocks = ty.lanes * VECTORS, row_blocks(m, MAX_ROWS)
    panels = -(-n // nr)
    # per k of one pass, the share of the next panel it prefetches: whole cache lines, the passes covering it
    ahead = -(-nr // len(blocks) // ty.lanes) * ty.lanes
    lines = list(ty.declarations)
    shapes = sorted({(rows, min(nr, n - p * nr)) for _, rows in blocks for p in range(panels)})
    for accumulate in (False, True):
        lines += [line for rows, width in shapes for line in _panel_tile(ty, k, n, rows, width, accumulate, ahead)]
        lines += [f"define void @{'addmm' if accumulate else 'mm'}(ptr noalias %A, ptr noalias %B, ptr noalias %C, "
                  "ptr %NEXT) nounwind {", "entry:"]
        full = n // nr
        if full:  # the full panels in a loop (code size independent of n), the row blocks straight inside
            lines += ["  br label %panels", "panels:", "  %p = phi i64 [0, %entry], [%p1, %panels]",
                      f"  %bo = mul i64 %p, {k * nr}", ty.gep("%bb", "%B", "%bo"), "  %p1 = add nuw nsw i64 %p, 1",
                      f"  %no = mul i64 %p1, {k * nr}", ty.gep("%nb", "%B", "%no"),
                      f"  %last = icmp eq i64 %p1, {panels}", "  %next = select i1 %last, ptr %NEXT, ptr %nb",
                      f"  %co = mul i64 %p, {nr}"]
            lines += _panel_calls(ty, blocks, k, n, nr, "%bb", "%co", "%next", ahead, accumulate, "f")
            lines += [f"  %done = icmp eq i64 %p1, {full}", "  br i1 %done, label %rest, label %panels", "rest:"]
        if n % nr:  # the last, narrower panel: its prefetch is the next matrix's
            lines += [ty.gep("%lb", "%B", full * k * nr)]
            lines += _panel_calls(ty, blocks, k, n, n % nr, "%lb", full * nr, "%NEXT", ahead, accumulate, "l")
        lines += ["  ret void", "}"]
    return "\n".join(lines)


def _panel_calls(ty: _Types, blocks: list, k: int, n: int, width: int, panel: str, column, following: str,
                 ahead: int, accumulate: bool, tag: str) -> list[str]:
    """One panel's passes, a call per row block: A's rows, the panel, C's block at ``column``, and the share of
    ``following`` (the next panel) each pass prefetches."""
    lines = []
    for b, (first, rows) in enumerate(blocks):
        lines += [ty.gep(f"%{tag}a{b}", "%A", first * k), f"  %{tag}co{b} = add i64 {column}, {first * n}",
                  ty.gep(f"%{tag}c{b}", "%C", f"%{tag}co{b}"), ty.gep(f"%{tag}f{b}", following, b * k * ahead),
                  f"  call void @panel_{rows}_{width}_{int(accumulate)}(ptr %{tag}a{b}, ptr {panel}, "
                  f"ptr %{tag}c{b}, ptr %{tag}f{b})"]
    return lines


def _panel_tile(ty: _Types, k: int, n: int, rows: int, width: int, accumulate: bool, ahead: int) -> list[str]:
    """``rows`` rows of C by ``width`` columns (one panel) over all of k; each k also prefetches ``ahead``
    elements of what comes next (``%pf``)."""
    nr, vectors = ty.lanes * VECTORS, -(-width // ty.lanes)
    valid = [min(ty.lanes, width - v * ty.lanes) for v in range(vectors)]
    body = [f"define internal void @panel_{rows}_{width}_{int(accumulate)}(ptr noalias %a, ptr noalias %b, "
            "ptr noalias %c, ptr %pf) alwaysinline nounwind {", "entry:"]
    for i in range(rows):
        for v in range(vectors):
            body.append(ty.gep(f"%cp{i}_{v}", "%c", i * n + v * ty.lanes))
            if accumulate:
                body.append(ty.vector_load(f"%init{i}_{v}", f"%cp{i}_{v}", valid[v]))
    body += ["  br label %loop", "loop:", "  %k = phi i64 [0, %entry], [%k1, %loop]"]
    for i in range(rows):
        for v in range(vectors):
            start = f"%init{i}_{v}" if accumulate else "zeroinitializer"
            body.append(f"  %acc{i}_{v} = phi {ty.vec} [{start}, %entry], [%new{i}_{v}, %loop]")
    body += [f"  %bo = mul i64 %k, {nr}", ty.gep("%bp", "%b", "%bo")]
    for v in range(vectors):  # the packed panel is zero-padded: whole vectors
        body += [ty.gep(f"%bp{v}", "%bp", v * ty.lanes), ty.vector_load(f"%bv{v}", f"%bp{v}", ty.lanes)]
    for i in range(rows):
        body += [f"  %ao{i} = add i64 %k, {i * k}", ty.gep(f"%ap{i}", "%a", f"%ao{i}"),
                 *ty.broadcast(f"%ab{i}", f"%ap{i}")]
        body += [f"  %new{i}_{v} = call {ty.vec} {ty.fma}({ty.vec} %ab{i}, {ty.vec} %bv{v}, {ty.vec} %acc{i}_{v})"
                 for v in range(vectors)]
    body += [f"  %po = mul i64 %k, {ahead}", ty.gep("%pp", "%pf", "%po")]
    for line in range(ahead // ty.lanes):  # one prefetch per cache line: read, into L2, data
        body += [ty.gep(f"%pl{line}", "%pp", line * ty.lanes), f"  call void @llvm.prefetch.p0(ptr %pl{line}, "
                 "i32 0, i32 2, i32 1)"]
    body += ["  %k1 = add nuw nsw i64 %k, 1", f"  %done = icmp eq i64 %k1, {k}",
             "  br i1 %done, label %exit, label %loop", "exit:"]
    for i in range(rows):
        for v in range(vectors):
            body.append(f"  store {ty.vec} %new{i}_{v}, ptr %cp{i}_{v}, align {ty.size}" if valid[v] == ty.lanes else
                        f"  call void {ty.store}({ty.vec} %new{i}_{v}, ptr %cp{i}_{v}, i32 {ty.size}, "
                        f"<{ty.lanes} x i1> {ty.mask(valid[v])})")
    return [*body, "  ret void", "}"]


# --------------------------------------------------------------------------------------------- dot form
def dot_ir(m: int, k: int, n: int, dtype: torch.dtype) -> str:
    """``mm(A, W, C)`` and ``addmm(...)``: C = / += A @ W^T, W (n x k) row-major (see the module's docstring).
    Blocks of W's rows outer (kept in L1 while every block of A's rows passes), the last one narrower."""
    ty = _Types(dtype)
    rows = _even_blocks(m, DOT_ROWS)
    cols = _even_blocks(n, DOT_COLS)
    lines = list(ty.declarations)
    for accumulate in (False, True):
        lines += [line for r in sorted({size for _, size in rows}) for c in sorted({size for _, size in cols})
                  for line in _dot_tile(ty, k, n, r, c, accumulate)]
        lines += [f"define void @{'addmm' if accumulate else 'mm'}(ptr noalias %A, ptr noalias %W, ptr noalias %C) "
                  "nounwind {", "entry:"]
        full = n // DOT_COLS
        if full:  # the full column blocks in a loop, the rows' blocks straight inside
            lines += ["  br label %cols", "cols:", "  %j = phi i64 [0, %entry], [%j1, %cols]",
                      f"  %wo = mul i64 %j, {DOT_COLS * k}", ty.gep("%wb", "%W", "%wo"),
                      f"  %cj = mul i64 %j, {DOT_COLS}"]
            lines += _dot_calls(ty, rows, k, n, DOT_COLS, "%wb", "%cj", accumulate, "f")
            lines += ["  %j1 = add nuw nsw i64 %j, 1", f"  %jd = icmp eq i64 %j1, {full}",
                      "  br i1 %jd, label %last, label %cols", "last:"]
        if n % DOT_COLS:
            lines += [ty.gep("%lw", "%W", full * DOT_COLS * k)]
            lines += _dot_calls(ty, rows, k, n, n % DOT_COLS, "%lw", full * DOT_COLS, accumulate, "l")
        lines += ["  ret void", "}"]
    return "\n".join(lines)


def _even_blocks(count: int, size: int) -> list[tuple[int, int]]:
    """Blocks of ``size`` and one last smaller one."""
    return [(first, min(size, count - first)) for first in range(0, count, size)]


def _dot_calls(ty: _Types, rows: list, k: int, n: int, cols: int, w: str, column, accumulate: bool, tag: str) -> list:
    lines = []
    for b, (first, size) in enumerate(rows):
        lines += [ty.gep(f"%{tag}a{b}", "%A", first * k), f"  %{tag}co{b} = add i64 {column}, {first * n}",
                  ty.gep(f"%{tag}c{b}", "%C", f"%{tag}co{b}"),
                  f"  call void @dot_{size}_{cols}_{int(accumulate)}(ptr %{tag}a{b}, ptr {w}, ptr %{tag}c{b})"]
    return lines


def _dot_tile(ty: _Types, k: int, n: int, rows: int, cols: int, accumulate: bool) -> list[str]:
    """C[i, j] (+)= A[i] . W[j] for ``rows`` rows of A and ``cols`` of W: vector partial sums along k (the last
    chunk masked), then :func:`_tree_sums`."""
    chunks, tail = divmod(k, ty.lanes)
    pairs = [(i, j) for i in range(rows) for j in range(cols)]
    body = [f"define internal void @dot_{rows}_{cols}_{int(accumulate)}(ptr noalias %a, ptr noalias %w, "
            "ptr noalias %c) alwaysinline nounwind {", "entry:", f"  br label %{'loop' if chunks else 'tail'}"]
    if chunks:
        body += ["loop:", "  %k = phi i64 [0, %entry], [%k1, %loop]"]
        body += [f"  %s{i}_{j} = phi {ty.vec} [zeroinitializer, %entry], [%n{i}_{j}, %loop]" for i, j in pairs]
        body += _dot_loads(ty, rows, cols, k, "%k", "", ty.lanes)
        body += [f"  %n{i}_{j} = call {ty.vec} {ty.fma}({ty.vec} %av{i}, {ty.vec} %wv{j}, {ty.vec} %s{i}_{j})"
                 for i, j in pairs]
        body += [f"  %k1 = add nuw nsw i64 %k, {ty.lanes}", f"  %done = icmp eq i64 %k1, {chunks * ty.lanes}",
                 "  br i1 %done, label %tail, label %loop"]
    body.append("tail:")
    body += [f"  %e{i}_{j} = phi {ty.vec} " + (f"[%n{i}_{j}, %loop]" if chunks else "[zeroinitializer, %entry]")
             for i, j in pairs]
    sums = {pair: f"%e{pair[0]}_{pair[1]}" for pair in pairs}
    if tail:
        body += _dot_loads(ty, rows, cols, k, chunks * ty.lanes, "t", tail)
        body += [f"  %f{i}_{j} = call {ty.vec} {ty.fma}({ty.vec} %tav{i}, {ty.vec} %twv{j}, {ty.vec} %e{i}_{j})"
                 for i, j in pairs]
        sums = {pair: f"%f{pair[0]}_{pair[1]}" for pair in pairs}
    for start in range(0, len(pairs), ty.lanes):  # one tree per vector's worth of dots
        batch = pairs[start:start + ty.lanes]
        name, order = _tree_sums(ty, body, [(sums[pair], [pair]) for pair in batch], f"q{start}")
        for lane, pair in enumerate(order):
            if pair is None:
                continue
            i, j = pair
            body += [f"  %x{i}_{j} = extractelement {ty.vec} {name}, i32 {lane}",
                     ty.gep(f"%cp{i}_{j}", "%c", i * n + j)]
            if accumulate:
                body += [f"  %o{i}_{j} = load {ty.t}, ptr %cp{i}_{j}, align {ty.size}",
                         f"  %y{i}_{j} = fadd {ty.t} %o{i}_{j}, %x{i}_{j}",
                         f"  store {ty.t} %y{i}_{j}, ptr %cp{i}_{j}, align {ty.size}"]
            else:
                body.append(f"  store {ty.t} %x{i}_{j}, ptr %cp{i}_{j}, align {ty.size}")
    return [*body, "  ret void", "}"]


def _dot_loads(ty: _Types, rows: int, cols: int, k: int, offset, prefix: str, valid: int) -> list[str]:
    """One chunk of each row of A (``%{prefix}av{i}``) and W (``%{prefix}wv{j}``) at ``offset`` along k."""
    lines = []
    for name, base, count in (("a", "%a", rows), ("w", "%w", cols)):
        for i in range(count):
            lines += [f"  %{prefix}{name}o{i} = add i64 {offset}, {i * k}",
                      ty.gep(f"%{prefix}{name}p{i}", base, f"%{prefix}{name}o{i}"),
                      ty.vector_load(f"%{prefix}{name}v{i}", f"%{prefix}{name}p{i}", valid)]
    return lines


def _tree_sums(ty: _Types, body: list, vectors: list, tag: str) -> tuple[str, list]:
    """Sum each of up to ``lanes`` vectors into one lane of a single vector: pairs of vectors with g groups of w
    lanes each (one group per dot) become one vector of 2g groups of w/2 lanes (low halves of each group plus high
    halves), until every group is one lane. Returns the vector and which dot each lane holds (None: padding)."""
    level = 0
    while len(vectors) > 1 or len(vectors[0][1]) < ty.lanes:
        if len(vectors) % 2:
            vectors = [*vectors, ("zeroinitializer", [None] * len(vectors[0][1]))]
        merged = []
        for p in range(0, len(vectors), 2):
            (a, groups_a), (b, groups_b) = vectors[p], vectors[p + 1]
            g = len(groups_a)
            width = ty.lanes // g
            half = width // 2
            low = [o + gi * width + j for o in (0, ty.lanes) for gi in range(g) for j in range(half)]
            high = [x + half for x in low]
            name = f"%{tag}l{level}p{p}"
            for part, picks in (("a", low), ("b", high)):
                body.append(f"  {name}{part} = shufflevector {ty.vec} {a}, {ty.vec} {b}, <{ty.lanes} x i32> <"
                            + ", ".join(f"i32 {x}" for x in picks) + ">")
            body.append(f"  {name} = fadd {ty.vec} {name}a, {name}b")
            merged.append((name, groups_a + groups_b))
        vectors, level = merged, level + 1
    return vectors[0]
