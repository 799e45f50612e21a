"""What a checkpoint of a training run holds, and how it is put back (no pickle: tensors + JSON).

Tensors: weights, the readout, optimizer buffers, persistent particles, the epoch's data order and
the torch RNG states. JSON: the config, position inside the epoch, running metrics, history,
optimizer hyper-parameters, scheduler state and the numpy/python RNG states.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from earlyprop.checkpoint import Checkpoint, CheckpointError, describe_mismatch
from earlyprop.config import TrainConfig

if TYPE_CHECKING:
    from earlyprop.train import Trainer

# settings that may change between a run and its resumption without changing its results
# settings that change speed or round-off only, like the device: a resumed run may change them
FREE_TO_CHANGE = ("data_dir", "checkpoint_every", "keep_checkpoints", "device", "native")


def snapshot(trainer: Trainer, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in trainer.network.state_dict().items()}
    if isinstance(trainer.rule.cost, torch.nn.Module):
        tensors.update({f"readout.{k}": v for k, v in trainer.rule.cost.state_dict().items()})
    optim = trainer.optimizer.state_dict()
    for index, values in optim["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    if trainer.particles is not None:
        tensors.update({f"particles.{i}": p for i, p in enumerate(trainer.particles)})
    if trainer.position.order is not None:
        tensors["order"] = trainer.position.order
    tensors["rng.generator"] = trainer.generator.get_state()
    tensors["rng.rule_generator"] = trainer.rule_generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    pos = trainer.position
    meta = {
        "config": trainer.config.to_dict(),
        "sizes": list(trainer.network.sizes),
        "epoch": epoch,
        "position": {"batch": pos.batch, "correct": pos.correct, "cost": pos.cost, "seen": pos.seen,
                     "free_steps": pos.free_steps},
        "batches_seen": trainer.batches_seen,
        "history": [m.__dict__ for m in trainer.history],
        "fidelity": trainer.fidelity,
        "param_groups": optim["param_groups"],
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_version": torch.__version__,
    }
    return tensors, meta


def restore(trainer: Trainer, checkpoint: Checkpoint) -> int:
    """Put the trainer back into the checkpoint's state; return the epoch to continue with."""
    from earlyprop.train import EpochMetrics, Position

    meta, tensors = checkpoint.meta, checkpoint.tensors
    check_compatible(trainer, meta, checkpoint)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        trainer.network.load_state_dict(model)
        if isinstance(trainer.rule.cost, torch.nn.Module):
            trainer.rule.cost.load_state_dict({k[len("readout."):]: v for k, v in tensors.items()
                                               if k.startswith("readout.")})
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit this network: {exc}") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if trainer.scheduler is not None and meta["scheduler"] is not None:
        trainer.scheduler.load_state_dict(meta["scheduler"])
    if trainer.particles is not None:
        trainer.particles = [tensors[f"particles.{i}"].to(trainer.particles[i].device)
                             for i in range(len(trainer.particles))]
    trainer.generator.set_state(tensors["rng.generator"])
    trainer.rule_generator.set_state(tensors["rng.rule_generator"])
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tupled(meta["rng_python"]))
    p = meta["position"]
    trainer.position = Position(tensors.get("order"), p["batch"], p["correct"], p["cost"], p["seen"],
                                p.get("free_steps", 0))
    trainer.batches_seen = meta["batches_seen"]
    trainer.history = [EpochMetrics(**row) for row in meta["history"]]
    trainer.fidelity = list(meta["fidelity"])
    trainer.log(f"resumed from {checkpoint.path.name}: epoch {meta['epoch']}, batch {p['batch']}")
    return int(meta["epoch"])


def check_compatible(trainer: Trainer, meta: dict[str, Any], checkpoint: Checkpoint) -> None:
    """CheckpointError naming every setting that differs from the checkpoint's."""
    sizes = list(trainer.network.sizes)
    if meta.get("sizes") != sizes:
        raise CheckpointError(f"checkpoint {checkpoint.path.name} is of another architecture: "
                              f"layer sizes {meta.get('sizes')} in the checkpoint, {sizes} configured")
    current = trainer.config.to_dict()
    keys = tuple(k for k in current if k not in FREE_TO_CHANGE)
    # a key newer than the checkpoint: its run had that setting's default behaviour
    stored = {**TrainConfig().to_dict(), **meta.get("config", {})}
    diff = describe_mismatch(current, stored, keys)
    if diff:
        raise CheckpointError(f"checkpoint {checkpoint.path.name} was made with other settings: {diff}")


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
