"""CUDA graphs of the lean chain's steps: ``Relaxation.cuda_graphs``, ``relax(..., cuda_graphs=)`` (issue 4; on by
default, ``False`` or ``--no-cuda-graphs`` launches the steps one by one).

On a GPU, a step of a layered net at research sizes is a handful of small kernels, and Python launching them costs
more than the device running them (config G, 784-1024-1024-10 at batch 256: ~0.26 ms per step on an H200, of which
the products are a fraction). Once a phase's step is a fixed list of calls (:class:`earlyprop.chain.Chain`'s
replayed calls: the same functions on the same tensors, step after step), a stretch of steps between two checks is
captured once as a CUDA graph and then replayed with one launch.

Correctness does not rest on the caller: a graph replays its kernels on the memory it was captured on, so graphs are
kept by the signature of their calls (:func:`signature`): each call's function, each tensor it is bound to by
address, shape, strides, dtype and device, every other argument by value. A stretch replays a graph only when its own
calls have the same signature, i.e. it would launch the same kernels on the same memory with the same constants;
otherwise it is captured anew (or, for calls that are not plain bound torch calls, run as it is). To make that
happen from batch to batch, a chain in graph mode keeps its buffers (the state, the fields, the static fields, the
nudge's pull) in :class:`PhaseBuffers` with its layout, copies each phase's values into them, and hands its result
back as a copy (so a returned state is never overwritten by the next phase).

No host synchronisation happens inside a stretch: the checks (finiteness, the residual) stay where ``check_every``
puts them, as without graphs. The first stretch of each layout runs eagerly on the capture stream (lazy
initialisations, e.g. cuBLAS's workspace, must not happen inside a capture); captures use the low-level
``CUDAGraph.capture_begin`` (no ``gc.collect`` / ``empty_cache`` per capture, as the context manager does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial
from types import BuiltinFunctionType

import torch
from torch import Tensor

Calls = Sequence[Callable[[], object]]


def signature(calls: Calls) -> tuple | None:
    """What a graph of ``calls`` depends on, or None when a call is not a builtin torch function or tensor method
    (bare, or in a ``functools.partial`` with tensor and plain-value arguments)."""
    out = []
    for call in calls:
        func, args, keywords = (call.func, call.args, call.keywords) if isinstance(call, partial) else (call, (), {})
        if not isinstance(func, BuiltinFunctionType):  # a Python function may branch on values or read the device
            return None
        owner = getattr(func, "__self__", None)
        if isinstance(owner, Tensor):
            head: tuple = (func.__name__, _tensor_key(owner))
        elif owner is None and func.__module__ == "torch":
            head = (func,)
        else:
            return None
        args, kwargs = _values(args), _values(tuple(sorted(keywords.items())))
        if args is None or kwargs is None:
            return None
        out.append((head, args, kwargs))
    return tuple(out)


def _tensor_key(t: Tensor) -> tuple:
    return ("tensor", t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _values(items) -> tuple | None:
    out = []
    for item in items:
        if isinstance(item, Tensor):
            out.append(_tensor_key(item))
        elif isinstance(item, tuple):
            inner = _values(item)
            if inner is None:
                return None
            out.append(inner)
        elif item is None or type(item) in (bool, int, float, str):
            out.append((type(item).__name__, item))
        else:
            return None
    return tuple(out)


class PhaseBuffers:
    """Tensors that keep their memory from phase to phase, for a chain in graph mode: each phase copies its values
    in (:meth:`keep`) or takes the same scratch buffer (:meth:`empty`). Kept with the chain's layout."""

    def __init__(self) -> None:
        self._kept: dict[str, Tensor] = {}

    def empty(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous buffer, the same one at every call with this name and geometry."""
        buf = self._kept.get(name)
        if (buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != device
                or buf.is_inference() and not torch.is_inference_mode_enabled()):  # made under inference_mode
            buf = self._kept[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def keep(self, name: str, value: Tensor) -> Tensor:
        """``value`` copied into the buffer of this name (an expanded value is materialised)."""
        return self.empty(name, value.shape, value.dtype, value.device).copy_(value)


class StepGraphs:
    """The captured stretches of one layout's chains, by signature and step count, at most :attr:`MAX_KEPT`."""

    MAX_KEPT = 32

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[tuple, Callable[[], None]] = {}
        self.captures = self.replays = self.eager_steps = 0  # counters, for tests and benchmarks
        self._warm = False
        self._stream = capture_stream(device) if device.type == "cuda" else None
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def advance(self, step: Callable[[bool], object], fixed_calls: Callable[[], Calls | None], count: int) -> None:
        """``count`` unmeasured steps: one ``step(False)`` at a time until the step is a fixed list of calls
        (``fixed_calls()`` not None; hard-sigmoid layers settle after their first projection), then the rest as
        one graph."""
        while count:
            calls = fixed_calls() if count > 1 else None
            key = signature(calls) if calls is not None else None
            if key is None:
                step(False)
                self.eager_steps += 1
                count -= 1
                continue
            self._run(calls, key, count)
            return

    def _run(self, calls: Calls, calls_key: tuple, count: int) -> None:
        key = (calls_key, count)
        graph = self.graphs.pop(key, None)
        if graph is None:
            if not self._warm:  # lazy initialisations (cuBLAS's workspace) outside any capture
                self._on_stream(lambda: _repeat(calls, count))
                self._warm = True
                self.eager_steps += count
                return
            graph = self._capture(calls, count)
            self.captures += 1
            while len(self.graphs) >= self.MAX_KEPT:
                del self.graphs[next(iter(self.graphs))]
        self.graphs[key] = graph  # most recently used last
        graph()
        self.replays += 1

    def _on_stream(self, work: Callable[[], None]) -> None:
        """``work`` on the capture stream, ordered after and before the device's current stream (a capture takes
        the current device's current stream, so the device is made current too)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                work()
            current.wait_stream(self._stream)

    def _capture(self, calls: Calls, count: int) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()

        def capture() -> None:
            graph.capture_begin(pool=self._pool)
            try:
                _repeat(calls, count)
            finally:
                graph.capture_end()

        self._on_stream(capture)
        return partial(self._replay, graph)

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        with torch.cuda.device(self.device):  # a graph launches on the current device's stream
            graph.replay()


def _repeat(calls: Calls, count: int) -> None:
    for _ in range(count):
        for call in calls:
            call()


@cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of every capture on ``device``, made once per process (as ``torch.cuda.graph``'s own): cuBLAS
    keeps a workspace per stream, tens of MiB on a Hopper card, so a stream per layout costs that much per layout
    (the bench's peak GPU memory on an H200: 311 MiB without graphs, 511 with a stream per layout, 351 with one per
    device; BENCHMARKS.md)."""
    return torch.cuda.Stream(device)


def step_graphs_for(device: torch.device) -> StepGraphs | None:
    """The graphs of a layout on ``device``: CUDA only (elsewhere ``cuda_graphs`` has no effect)."""
    return StepGraphs(device) if device.type == "cuda" else None
