"""The packed batch-sized products of earlyprop.small_gemm: each product against a float64 reference, across the
shapes its register blocks and panels split unevenly (rows, ragged last panels), and the prefetch links. Where
the chain uses them: tests/speed/test_fast_paths.py."""

from __future__ import annotations

import pytest
import torch

from earlyprop import small_gemm

pytestmark = pytest.mark.skipif(not small_gemm.installed(),
                                reason="llvmlite is not installed: no packed products here (pip install numba)")

# (batch, k, n): one row block and several (20 -> 10 + 10, 29 -> 10 + 10 + 9), full and ragged last panels
# (NR = 32 floats, 16 doubles) or none, the last full panel prefetching the next matrix, tall and wide
SHAPES = [(20, 500, 500), (1, 32, 32), (13, 40, 33), (29, 64, 70), (29, 64, 64), (16, 784, 100), (64, 17, 40),
          (7, 50, 16)]


def operands(m, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((m, k), (k, n), (m, n)))
    return a.to(dtype), b.to(dtype), c.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 5e-15)])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_products_equal_matmul(m, k, n, dtype, tol):
    a, b, c = operands(m, k, n, dtype)
    if min(k, n) < small_gemm.VECTORS * 64 // a.element_size():  # narrower than a panel: torch multiplies
        assert not small_gemm.applies(a, b, c)
        return
    exact = a.double() @ b.double()
    scale = float(exact.abs().max())
    packed = small_gemm.PackedMatrix(b)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # mm must not read what out held
    packed.into(a, out)()
    assert float((out.double() - exact).abs().max()) <= tol * scale
    acc = c.clone()
    packed.into(a, acc, accumulate=True)()
    assert float((acc.double() - (c.double() + exact)).abs().max()) <= tol * scale
    # a transposed view packs like its contiguous copy
    twin = small_gemm.PackedMatrix(b.t().contiguous().t())
    assert torch.equal(twin.data, packed.data)


def test_products_read_row_major_operands_of_their_shape_only():
    a, b, c = operands(20, 64, 48, torch.float64)
    assert small_gemm.applies(a, b, c)
    assert not small_gemm.applies(a.t().contiguous().t(), b, c)  # column-major a
    assert not small_gemm.applies(a, b, c.t().contiguous().t())
    assert not small_gemm.applies(a.float(), b, c) and not small_gemm.applies(a, b[:, :8], c[:, :8])
    assert not small_gemm.applies(torch.zeros(65, 64, dtype=torch.float64), b, torch.zeros(65, 48, dtype=b.dtype))
    packed = small_gemm.PackedMatrix(b)
    with pytest.raises(ValueError, match="no packed product"):
        packed.into(a[:, :10].contiguous(), c)  # a's columns are not B's rows
    half = c[:10].clone()
    packed.into(a[:10].contiguous(), half)()  # any batch: the same packs
    assert torch.allclose(half, a[:10] @ b, rtol=1e-12, atol=1e-12)


def test_link_points_each_product_at_the_next_packed_matrix():
    a, b, c = operands(20, 64, 64, torch.float32)
    packs = [small_gemm.PackedMatrix(b * i) for i in range(3)]
    calls = [packs[0].into(a, c), print, packs[1].into(a, c, accumulate=True), packs[2].into(a, c, accumulate=True)]
    small_gemm.link(calls)
    nexts = [call.args[3] for call in calls if isinstance(call, small_gemm.Product)]
    assert nexts == [packs[1].data.data_ptr(), packs[2].data.data_ptr(), packs[0].data.data_ptr()]
    for call in calls[2:]:
        call()
    calls[0]()  # out = a @ b * 0 ...
    for call in calls[2:]:
        call()  # ... then += a @ b, += a @ 2b: 3 a @ b, whatever each prefetched
    assert torch.allclose(c, 3 * (a @ b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 5e-15)])
@pytest.mark.parametrize("m, k, n", [*SHAPES, (20, 784, 500), (3, 5, 2), (17, 100, 9)])
def test_products_by_a_transposed_matrix_read_in_place(m, k, n, dtype, tol, monkeypatch):
    """a @ W^T from W's own rows (blocks of 4 x 4 dots, the last rows and columns and chunk of k partial)."""
    monkeypatch.setattr(small_gemm, "available", lambda: True)  # on any CPU
    a, w, c = operands(m, k, n, dtype)
    w = w.t().contiguous()[:n] if k == n else torch.randn(n, k, dtype=dtype, generator=torch.Generator().manual_seed(3))
    exact = a.double() @ w.double().T
    scale = float(exact.abs().max())
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert small_gemm.times_transposed(a, w, out)
    assert float((out.double() - exact).abs().max()) <= tol * scale
    acc = c.clone()
    assert small_gemm.times_transposed(a, w, acc, accumulate=True)
    assert float((acc.double() - (c.double() + exact)).abs().max()) <= tol * scale
    # what it does not take, it leaves to torch, untouched
    assert not small_gemm.times_transposed(a, w.t().contiguous().t(), out)
    assert not small_gemm.times_transposed(a, w.float() if dtype == torch.float64 else w.double(), out)
    monkeypatch.setattr(small_gemm, "available", lambda: False)
    before = out.clone()
    assert not small_gemm.times_transposed(a, w, out) and torch.equal(out, before)


def test_a_host_llvm_cannot_describe_leaves_the_products_off(monkeypatch):
    def fail():
        raise RuntimeError("no host features here")

    monkeypatch.setattr(small_gemm.llvm, "get_host_cpu_features", fail)
    small_gemm._host.cache_clear()
    try:
        assert not small_gemm.installed() and not small_gemm.available()
    finally:
        monkeypatch.undo()
        small_gemm._host.cache_clear()
    assert small_gemm.installed()
