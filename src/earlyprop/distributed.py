"""Data-parallel training with PyTorch's own stack (``torchrun``): each rank relaxes its shard of the
batch, and the parameter gradients, which the learning rules leave in ``.grad``, are all-reduced.

Every rank draws the same data order from the same seeded generator and takes every ``world``-th
example of each batch, so N processes see exactly the batches one process would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank and world size (1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's examples of a global batch."""
        return idx[self.rank::self.world] if self.world > 1 else idx

    def average_grads(self, params: Sequence[torch.nn.Parameter], local: int, total: int) -> None:
        """Turn per-rank batch-mean gradients into the gradient of the mean over the global batch."""
        if self.world == 1:
            return
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grad.mul_(local / total)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            p.grad = grad

    def gather_shards(self, local: Tensor, total: int) -> Tensor:
        """The rows of a global batch of ``total`` examples from every rank's shard (:meth:`shard`), in the
        global order: every rank gets all of them (persistent particles stay identical on every rank)."""
        if self.world == 1:
            return local
        rows = -(-total // self.world)  # all_gather needs equal shapes: pad each shard to the largest
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        out = local.new_empty((total, *local.shape[1:]))
        for rank, part in enumerate(parts):
            out[rank::self.world] = part[:len(range(rank, total, self.world))]
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (metrics)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def collective_device() -> torch.device:
    """Where a tensor made for a collective must live: nccl reduces CUDA tensors only (this rank's GPU), gloo CPU
    ones too."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_group() -> Group:
    if _initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def init_from_environment(device: str = "cpu") -> Group:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU).

    On GPUs each rank takes its own: a device without an index (``"cuda"``, or ``"auto"`` where a GPU is visible)
    becomes the rank's ``LOCAL_RANK``-th (NCCL refuses two ranks on one device, and all would land on the first)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _initialized():
        return current_group()
    cuda = (device.startswith("cuda") or device == "auto") and torch.cuda.is_available()
    if cuda and device in ("cuda", "auto") and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current_group()


@contextmanager
def joined_group(device: str = "cpu") -> Iterator[Group]:
    """:func:`init_from_environment` for the length of a ``with`` block, leaving the group it joined at the end.

    A rank that exits with its process group still alive can die of SIGABRT while the interpreter shuts down
    (gloo's worker threads still hold tensors, whose release then needs the GIL of a finalising interpreter),
    and torchrun then stops the whole job: so the group is destroyed before the process ends, after a barrier
    on a normal exit (no rank leaves while another still collects), without one after an error (it could hang).
    """
    already = _initialized()  # someone else's group: theirs to leave
    group = init_from_environment(device)
    joined = not already and group.world > 1
    try:
        yield group
    except BaseException:
        if joined:
            dist.destroy_process_group()
        raise
    else:
        if joined:
            dist.barrier()
            dist.destroy_process_group()
