"""Training configuration: one dataclass, read from TOML and overridden by CLI flags.

Unknown or mistyped keys are an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from earlyprop.conv import parse_conv_specs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


AMP_CHOICES = ("none", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


@dataclass
class TrainConfig:
    """Everything a training run needs. Per-layer lists run input -> output (THEORY A18)."""

    data: str = "digits"
    data_dir: str | None = None
    validation: float = 0.0
    rule: str = "stdp"
    stdp_form: str = "plain"
    hidden: list[int] = field(default_factory=lambda: [256])
    conv: str = ""
    rho: str = "hard_sigmoid"
    output_rho: str | None = None
    cost: str = "squared_error"
    epochs: int = 30
    batch_size: int = 20
    lr: list[float] = field(default_factory=lambda: [0.05, 0.025])
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    beta: float = 1.0
    eps: float = 0.5
    free_steps: int = 40
    nudge_steps: int = 4
    eval_steps: int = 40
    solver: str = "euler"
    omega: float = 1.0  # over-relaxation of the async solver (1 = exact block updates)
    tol: float = 0.0  # a free phase stops once its residual is <= tol (checked every check_every steps); 0: off
    check_every: int = 10
    native: bool = True  # compiled CPU relaxation kernels where they apply (numba; earlyprop.native)
    cuda_graphs: bool = True  # on CUDA, stretches of relaxation steps as CUDA graphs (earlyprop.cuda_graphs)
    nudge_scale: str = "eps"
    project: bool = True
    persistent: bool = False
    truncation: int | None = None
    init: str = "glorot"
    gain: float = 0.25  # initial weights: Glorot bound (or fan-in std) times gain; small helps EP (README)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    amp: str = "none"
    monitor_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad value."""
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (math.isfinite(self.beta), f"beta must be finite, got {self.beta}"),
            (math.isfinite(self.gain) and self.gain > 0, f"gain must be > 0, got {self.gain}"),
            (self.init in ("glorot", "gaussian"), f"init must be 'glorot' or 'gaussian', got {self.init!r}"),
            (self.free_steps >= 1, f"free-steps must be >= 1, got {self.free_steps}"),
            (self.nudge_steps >= 1, f"nudge-steps must be >= 1, got {self.nudge_steps}"),
            (self.eval_steps >= 1, f"eval-steps must be >= 1, got {self.eval_steps}"),
            (all(h >= 1 for h in self.hidden) and (len(self.hidden) >= 1 or bool(self.conv)),
             f"hidden must be a non-empty list of positive sizes, got {self.hidden}"),
            (all(math.isfinite(v) and v >= 0 for v in self.lr) and len(self.lr) >= 1,
             f"lr must be non-negative numbers, got {self.lr}"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}"),
            (self.scheduler in ("none", "cosine"), f"scheduler must be 'none' or 'cosine', got {self.scheduler!r}"),
            (self.cost in ("squared_error", "cross_entropy"),
             f"cost must be 'squared_error' or 'cross_entropy', got {self.cost!r}"),
            (self.nudge_scale in ("eps", "none"), f"nudge_scale must be 'eps' or 'none', got {self.nudge_scale!r}"),
            (self.solver in ("euler", "async"), f"solver must be 'euler' or 'async', got {self.solver!r}"),
            (0.0 < self.omega < 2.0, f"omega must be in (0, 2), got {self.omega}"),
            (self.omega == 1.0 or self.solver == "async", f"omega = {self.omega} needs --solver async"),
            (math.isfinite(self.tol) and self.tol >= 0, f"tol must be >= 0 (0: off), got {self.tol}"),
            (self.check_every >= 1, f"check-every must be >= 1, got {self.check_every}"),
            (self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}"),
            (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}"),
            (0 <= self.validation < 60000, f"validation must be >= 0, got {self.validation}"),
            (self.checkpoint_every >= 0, f"checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.monitor_every >= 0, f"monitor-every must be >= 0, got {self.monitor_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.rule.startswith(("ep", "stdp")) and self.beta == 0:
            raise ConfigError(f"beta = 0 gives no learning signal with --rule {self.rule}; use beta != 0")
        try:
            parse_conv_specs(self.conv)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        n_layers = self.n_weight_layers()
        if len(self.lr) not in (1, n_layers):
            raise ConfigError(f"lr needs 1 or {n_layers} values (one per weight layer), got {len(self.lr)}")
        self._check_device()
        return self

    def _check_device(self) -> None:
        if self.device == "auto":
            return
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available here; use --device cpu "
                              "or --device auto")

    def n_weight_layers(self) -> int:
        """Conv layers + hidden layers + the output layer: one learning rate each."""
        return len(parse_conv_specs(self.conv) if self.conv else []) + len(self.hidden) + 1

    def layer_lrs(self) -> list[float]:
        return self.lr * self.n_weight_layers() if len(self.lr) == 1 else list(self.lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(key: str, value: Any) -> Any:
    """Check a config value's type against the field and convert ints to floats where needed."""
    if key not in FIELDS:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(FIELDS))}")
    default = getattr(TrainConfig(), key)
    if isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        kind = int if key == "hidden" else float
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise ConfigError(f"config key {key!r} expects a list of numbers, got {value!r}")
        if kind is int and not all(float(v).is_integer() for v in items):
            raise ConfigError(f"config key {key!r} expects integers, got {value!r}")
        return [kind(v) for v in items]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if isinstance(default, int) or key == "truncation":
        if value is None and key == "truncation":
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return value
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
    return value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- TOML file <- overrides (CLI flags that were given)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        raw.pop("result", None)  # shipped configs document their measured result here
        values.update({k: coerce(k, v) for k, v in raw.items()})
    values.update({k: coerce(k, v) for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values).validate()


def dump_toml(config: TrainConfig) -> str:
    """A TOML text that :func:`load_config` reads back to the same config."""
    lines = []
    for key, value in config.to_dict().items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
