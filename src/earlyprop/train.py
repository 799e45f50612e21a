"""The trainer: minibatches, optional persistent particles, evaluation by free relaxation, metrics.

A run directory holds ``config.toml``, ``metrics.csv``, ``summary.json``, the plots and, when
the gradient-fidelity monitor is on, ``fidelity.csv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from earlyprop.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from earlyprop.config import TrainConfig
from earlyprop.conv import conv_network, parse_conv_specs
from earlyprop.cost import CrossEntropyReadout, SquaredError
from earlyprop.data import Dataset, check_features, load_dataset
from earlyprop.distributed import current_group
from earlyprop.network import Network
from earlyprop.rules import LearningRule, Relaxation, make_rule
from earlyprop.rules.reference import RecurrentBackprop
from earlyprop.rundir import RunDirectory
from earlyprop.trainstate import restore, snapshot

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_network(config: TrainConfig, n_features: int, n_classes: int,
                  image_shape: tuple[int, ...] | None = None) -> Network:
    """The layered net n_features - [conv...] - hidden... - n_classes; inputs in [0,1] enter as they are.

    Conv layers (``config.conv``) need the inputs' ``image_shape`` (C, H, W)."""
    if config.conv:
        if image_shape is None or len(image_shape) != 3 or math.prod(image_shape) != n_features:
            raise ValueError(f"conv layers need image inputs (channels, height, width); this data set's inputs have "
                             f"shape {image_shape}: use --conv with digits, mnist, fashion-mnist or cifar10")
        return conv_network(image_shape, parse_conv_specs(config.conv), config.hidden, n_classes, config.rho,
                            input_rho="linear", output_rho=config.output_rho, gain=config.gain, seed=config.seed,
                            dtype=DTYPES[config.dtype]).to(resolve_device(config.device))
    sizes = [n_features, *config.hidden, n_classes]
    return Network.layered(sizes, config.rho, input_rho="linear", output_rho=config.output_rho, init=config.init,
                           gain=config.gain,
                           seed=config.seed, dtype=DTYPES[config.dtype]).to(resolve_device(config.device))


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_rule(config: TrainConfig, network: Network) -> LearningRule:
    relaxation = Relaxation(eps=config.eps, free_steps=config.free_steps, nudge_steps=config.nudge_steps,
                            project=config.project, method=config.solver, nudge_scale=config.nudge_scale,
                            omega=config.omega, tol=config.tol or None, check_every=config.check_every,
                            native=config.native, cuda_graphs=config.cuda_graphs)
    if config.cost == "cross_entropy":
        n_out = network.sizes[network.driven]
        cost = CrossEntropyReadout(n_out, n_out, network.rhos[network.driven]).to(network.dtype).to(network.device)
    else:
        cost = SquaredError()
    return make_rule(config.rule, beta=config.beta, relaxation=relaxation, cost=cost, stdp_form=config.stdp_form,
                     truncation=config.truncation)


def build_optimizer(config: TrainConfig, network: Network, rule: LearningRule) -> torch.optim.Optimizer:
    """One parameter group per weight layer (EP17 Table 2 alpha_k): W_l and the bias of layer l+1."""
    lrs = config.layer_lrs()
    groups = []
    for i, term in enumerate(network.layered_pairs()):
        groups.append({"params": [term.weight, network.bias(term.post)], "lr": lrs[i]})
    grouped = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in network.parameters() if id(p) not in grouped] + rule.extra_parameters()
    if rest:
        groups.append({"params": rest, "lr": lrs[-1]})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)


@dataclass
class EpochMetrics:
    epoch: int
    train_accuracy: float
    train_cost: float
    test_accuracy: float
    test_cost: float
    seconds: float
    examples_per_second: float
    free_steps: float = math.nan  # mean steps of a training batch's free phase (< free_steps when --tol stops it)


@dataclass
class Position:
    """Where the run is inside an epoch: data order, next batch, and the running train metrics."""

    order: Tensor | None = None
    batch: int = 0
    correct: int = 0
    cost: float = 0.0
    seen: int = 0
    free_steps: int = 0  # summed over the epoch's batches (on this rank)


@dataclass
class Trainer:
    """Fits a network with a learning rule; owns the persistent particles (DESIGN principle 4).

    With a run directory and ``checkpoint_every`` > 0 it writes a checkpoint every N batches and at
    the end of every epoch; :meth:`fit` with ``resume=True`` continues from the newest valid one and
    ends with exactly the metrics and weights of an uninterrupted run.
    """

    config: TrainConfig
    dataset: Dataset
    out: Path | None = None
    progress: bool = False
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))

    def __post_init__(self) -> None:
        if self.config.device == "auto":
            self.config = dataclasses.replace(self.config, device=resolve_device(self.config.device))
        c = self.config
        torch.manual_seed(c.seed)
        self.dtype = DTYPES[c.dtype]
        self.network = build_network(c, self.dataset.n_features, self.dataset.n_classes, self.dataset.image_shape)
        check_features(self.dataset, self.network.sizes[0])
        self.rule = build_rule(c, self.network)
        self.optimizer = build_optimizer(c, self.network, self.rule)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(c.epochs, 1))
                          if c.scheduler == "cosine" else None)
        self.group = current_group()
        if not self.group.is_main:
            self.log = lambda message: None
        # the data order must be identical on every rank; the rules' own randomness (random-sign beta)
        # comes from a second generator so that it cannot shift the data order
        self.generator = torch.Generator().manual_seed(c.seed)
        self.rule_generator = torch.Generator().manual_seed(c.seed + 7919 * (self.group.rank + 1))
        as_tensor = lambda a: torch.as_tensor(a).to(c.device)  # noqa: E731
        self.x_train = as_tensor(self.dataset.x_train).to(self.dtype)
        self.y_train = as_tensor(self.dataset.y_train).long()
        self.x_test = as_tensor(self.dataset.x_test).to(self.dtype)
        self.y_test = as_tensor(self.dataset.y_test).long()
        self.particles = ([torch.zeros(len(self.x_train), n, dtype=self.dtype, device=c.device)
                           for n in self.network.sizes] if c.persistent else None)
        self.history: list[EpochMetrics] = []
        self.fidelity: list[dict[str, float]] = []
        self.batches_seen = 0
        self.position = Position()
        self.run_dir = RunDirectory(self.out) if self.out is not None else None
        self.writer = self.run_dir if self.group.is_main else None  # one rank writes files

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> tuple[float, float, int, float]:
        """Train on the epoch's remaining batches (all of them unless resuming mid-epoch); return the accuracy, cost,
        examples and mean free-phase steps per batch (NaN for a rule without a free phase) over the epoch."""
        pos, bs = self.position, self.config.batch_size
        if pos.order is None:
            pos.order = torch.randperm(len(self.x_train), generator=self.generator).to(self.x_train.device)
        n_batches = math.ceil(len(pos.order) / bs)
        for i in range(pos.batch, n_batches):
            idx = pos.order[i * bs:(i + 1) * bs]
            self.train_batch(idx)
            pos.batch = i + 1
            every = self.config.checkpoint_every
            if every and self.batches_seen % every == 0 and pos.batch < n_batches:
                self.save_checkpoint(epoch)
            if self.progress:
                print(f"\repoch {epoch} [{i + 1}/{n_batches}] train acc {pos.correct / pos.seen:.4f}", end="",
                      file=sys.stderr, flush=True)
        if self.progress:
            print("\r", end="", file=sys.stderr)
        correct, cost, seen, steps = self.group.sum([pos.correct, pos.cost, pos.seen, pos.free_steps])
        batches = pos.batch * self.group.world  # every rank runs every batch, on its shard
        free_steps = steps / batches if batches and steps else math.nan
        return correct / max(seen, 1), cost / max(seen, 1), int(seen), free_steps

    def train_batch(self, batch: Tensor) -> None:
        idx = self.group.shard(batch)
        xb, yb = self.x_train[idx], self.y_train[idx]
        target = self.rule.cost.encode(yb, self.dataset.n_classes, self.dtype)
        state = self._particles(idx, xb)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            step = self.rule.compute_grads(self.network, xb, target, state=state, generator=self.rule_generator)
        self.group.average_grads(list(self.network.parameters()) + self.rule.extra_parameters(), len(idx),
                                 len(batch))
        if self.config.monitor_every and self.batches_seen % self.config.monitor_every == 0:
            self._monitor(step.free_state, target)
        self.optimizer.step()
        if self.particles is not None:  # every rank keeps every particle: the next epoch shards differently
            free = self.network.free
            rows = self.group.gather_shards(torch.cat([step.free_state[m] for m in free], 1), len(batch))
            for layer, part in zip(free, rows.split([self.network.sizes[m] for m in free], 1)):
                self.particles[layer][batch] = part
        self.position.correct += int((step.prediction == yb).sum())
        self.position.cost += float(step.cost.sum())
        self.position.seen += len(yb)
        self.position.free_steps += step.free_steps or 0
        self.batches_seen += 1

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast of the relaxation's products (``--amp``); parameters and gradients stay float32."""
        if self.config.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.network.device.type, dtype=AMP_DTYPES[self.config.amp])

    def _particles(self, idx: Tensor, xb: Tensor) -> list[Tensor] | None:
        if self.particles is None:
            return None
        state = [p[idx].clone() for p in self.particles]
        state[0] = xb
        return state

    def _monitor(self, free_state: list[Tensor], target: Tensor) -> None:
        """Per-layer cosine between the rule's update and the true gradient (recurrent backprop)."""
        params = list(self.network.parameters())
        estimate = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        reference = RecurrentBackprop(relaxation=self.rule.relaxation, cost=self.rule.cost)
        true = reference.gradient(self.network, free_state, target)
        row: dict[str, float] = {"batch": float(self.batches_seen)}
        for (name, _), g, t in zip(self.network.named_parameters(), estimate, true):
            denom = float(g.norm() * t.norm())
            row[name] = float((g * t).sum()) / denom if denom > 0 else math.nan
        self.fidelity.append(row)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int = 500) -> tuple[float, float]:
        """Accuracy and mean cost by free relaxation from rest (``eval_steps`` steps) and argmax."""
        relaxation = dataclasses.replace(self.rule.relaxation, free_steps=self.config.eval_steps)
        rule = self.rule
        correct, cost_sum = 0, 0.0
        x, y = x[self.group.rank::self.group.world], y[self.group.rank::self.group.world]
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            with self._autocast():
                output, prediction = rule.answer(self.network, xb, relaxation)
            output = output.to(self.dtype)
            target = rule.cost.encode(yb, self.dataset.n_classes, self.dtype)
            correct += int((prediction == yb).sum())
            cost_sum += float(rule.cost.value(output, target).sum())
        correct, cost_sum, count = self.group.sum([correct, cost_sum, len(y)])
        return correct / count, cost_sum / count

    # ------------------------------------------------------------------ the run
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs (from the newest checkpoint if ``resume``); return the summary."""
        start_epoch = self.resume() if resume else 1
        if self.writer is not None:
            self.writer.start(self.config)
        start = time.perf_counter()
        examples = 0
        for epoch in range(start_epoch, self.config.epochs + 1):
            t0 = time.perf_counter()
            train_acc, train_cost, seen, free_steps = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - t0
            examples += seen
            if self.scheduler is not None:
                self.scheduler.step()
            test_acc, test_cost = self.evaluate(self.x_test, self.y_test)
            metrics = EpochMetrics(epoch, train_acc, train_cost, test_acc, test_cost, time.perf_counter() - t0,
                                   seen / max(train_seconds, 1e-9), free_steps)
            self.history.append(metrics)
            self.position = Position()
            steps_note = f"  free steps {free_steps:.1f}" if self.config.tol else ""
            self.log(f"epoch {epoch:3d}  train acc {train_acc:.4f}  cost {train_cost:.4f}  test acc {test_acc:.4f}"
                     f"  cost {test_cost:.4f}  {metrics.seconds:.1f}s  {metrics.examples_per_second:.0f} ex/s"
                     + steps_note)
            if self.writer is not None:
                self.writer.write_table("metrics.csv", [m.__dict__ for m in self.history])
                self.writer.write_table("fidelity.csv", self.fidelity)
                self.writer.log_scalars(epoch, {"accuracy/train": train_acc, "accuracy/test": test_acc,
                                                "cost/train": train_cost, "cost/test": test_cost})
                if self.config.checkpoint_every:
                    self.save_checkpoint(epoch + 1)
        seconds = time.perf_counter() - start
        train_acc, train_cost = self.evaluate(self.x_train, self.y_train)
        test_acc, test_cost = self.evaluate(self.x_test, self.y_test)
        summary = {
            "rule": self.config.rule, "data": self.config.data, "sizes": list(self.network.sizes),
            "test_accuracy": test_acc, "train_accuracy": train_acc, "test_cost": test_cost, "train_cost": train_cost,
            "best_test_accuracy": max((m.test_accuracy for m in self.history), default=test_acc),
            "epochs": self.config.epochs, "seconds": seconds,
            "examples_per_second": examples / seconds if seconds > 0 else 0.0,
            "seed": self.config.seed, "out": str(self.out) if self.out else None,
            "resumed_from_epoch": start_epoch if resume else None,
        }
        if self.writer is not None:
            weights = dict(self.network.state_dict())
            if isinstance(self.rule.cost, torch.nn.Module):
                weights.update({f"readout.{k}": v for k, v in self.rule.cost.state_dict().items()})
            self.writer.finish(summary, self.history, self.fidelity, f"{self.config.rule} on {self.config.data}",
                                self.log, weights)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch: int) -> None:
        """Snapshot everything the rest of the run depends on (``epoch`` = the epoch to continue)."""
        if self.writer is None:
            return
        tensors, meta = snapshot(self, epoch)
        try:
            save_checkpoint(self.run_dir.checkpoints, self.batches_seen, tensors, meta, self.config.keep_checkpoints)
        except OSError as exc:
            raise OSError(f"could not write a checkpoint into {self.run_dir.checkpoints} ({exc.strerror or exc}); "
                          "the previous checkpoint is intact: free space and rerun with --resume") from exc

    def resume(self) -> int:
        """Load the newest valid checkpoint of the run directory; return the epoch to continue with."""
        if self.run_dir is None:
            raise CheckpointError("--resume needs a run directory (--out)")
        checkpoint = latest_checkpoint(self.run_dir.checkpoints, warn=self.log)
        if checkpoint is None:
            self.log(f"no checkpoint in {self.run_dir.checkpoints}: starting from scratch")
            return 1
        return restore(self, checkpoint)

def train(config: TrainConfig, out: str | Path | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None, resume: bool = False) -> dict[str, Any]:
    """One call: load the data, build network and rule, fit, return the summary (jpc-style API)."""
    dataset = load_dataset(config.data, config.data_dir, validation=config.validation, seed=config.seed)
    if config.validation:
        dataset = _validation_as_test(dataset)
    kwargs = {"log": log} if log is not None else {}
    return Trainer(config, dataset, Path(out) if out else None, progress, **kwargs).fit(resume=resume)


def _validation_as_test(dataset: Dataset) -> Dataset:
    """Model selection on the validation split: it takes the test split's place (test stays unseen)."""
    return dataclasses.replace(dataset, x_test=dataset.x_val, y_test=dataset.y_val, x_val=None, y_val=None,
                               name=dataset.name + "[validation]")
