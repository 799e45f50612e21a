"""The run directory: config.toml, metrics.csv, fidelity.csv, summary.json, plots, checkpoints/.

Every file is replaced atomically, so a run killed at any moment leaves readable files behind.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from earlyprop.checkpoint import atomic_write
from earlyprop.config import TrainConfig, dump_toml


class RunDirectory:
    """Writes a run's artefacts into ``path`` (which the caller has checked may be written)."""

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self._events = None

    def start(self, config: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "config.toml", dump_toml(config).encode())
        self._events = _tensorboard_writer(self.path / "tensorboard")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars (``tensorboard/``), when the optional tensorboard package is installed."""
        if self._events is None:
            return
        for name, value in values.items():
            self._events.add_scalar(name, value, step)
        self._events.flush()

    def write_table(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / name, buffer.getvalue().encode())

    def finish(self, summary: dict[str, Any], history: Sequence[Any], fidelity: Sequence[dict[str, float]],
               title: str, log, weights: dict[str, torch.Tensor]) -> None:
        """summary.json, the final weights (model.safetensors) and the plots."""
        atomic_write(self.path / "model.safetensors",
                     save_safetensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}))
        atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if self._events is not None:
            self._events.close()
        try:
            from earlyprop.plots import plot_fidelity, plot_training

            plot_training(history, self.path, title=title)
            if fidelity:
                plot_fidelity(fidelity, self.path / "fidelity.png")
        except ImportError as exc:  # matplotlib is optional at run time
            log(f"plots skipped: {exc}")


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(log_dir=str(folder))
