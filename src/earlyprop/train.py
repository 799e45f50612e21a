"""The trainer: minibatches, optional persistent particles, evaluation by free relaxation, metrics.

A run directory holds ``config.toml``, ``metrics.csv``, ``summary.json``, the plots and, when
the gradient-fidelity monitor is on, ``fidelity.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from earlyprop.config import TrainConfig, dump_toml
from earlyprop.cost import CrossEntropyReadout, SquaredError
from earlyprop.data import Dataset, check_features, iterate_minibatches, load_dataset
from earlyprop.network import Network
from earlyprop.rules import LearningRule, Relaxation, make_rule
from earlyprop.rules.reference import RecurrentBackprop

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_network(config: TrainConfig, n_features: int, n_classes: int) -> Network:
    """The layered net n_features - hidden... - n_classes; inputs in [0,1] enter as they are."""
    sizes = [n_features, *config.hidden, n_classes]
    return Network.layered(sizes, config.rho, input_rho="linear", output_rho=config.output_rho, init=config.init,
                           gain=config.gain,
                           seed=config.seed, dtype=DTYPES[config.dtype]).to(config.device)


def build_rule(config: TrainConfig, network: Network) -> LearningRule:
    relaxation = Relaxation(eps=config.eps, free_steps=config.free_steps, nudge_steps=config.nudge_steps,
                            project=config.project, method=config.solver, nudge_scale=config.nudge_scale)
    if config.cost == "cross_entropy":
        n_out = network.sizes[network.driven]
        cost = CrossEntropyReadout(n_out, n_out, network.rhos[network.driven]).to(network.dtype).to(config.device)
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


@dataclass
class Trainer:
    """Fits a network with a learning rule; owns the persistent particles (DESIGN principle 4)."""

    config: TrainConfig
    dataset: Dataset
    out: Path | None = None
    progress: bool = False
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))

    def __post_init__(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.dtype = DTYPES[c.dtype]
        self.network = build_network(c, self.dataset.n_features, self.dataset.n_classes)
        check_features(self.dataset, self.network.sizes[0])
        self.rule = build_rule(c, self.network)
        self.optimizer = build_optimizer(c, self.network, self.rule)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(c.epochs, 1))
                          if c.scheduler == "cosine" else None)
        self.generator = torch.Generator().manual_seed(c.seed)
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

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> tuple[float, float, int]:
        correct, cost_sum, seen = 0, 0.0, 0
        n_batches = math.ceil(len(self.x_train) / self.config.batch_size)
        for i, (idx, xb, yb) in enumerate(iterate_minibatches(self.x_train, self.y_train, self.config.batch_size,
                                                              self.generator)):
            target = self.rule.cost.encode(yb, self.dataset.n_classes, self.dtype)
            state = self._particles(idx, xb)
            self.optimizer.zero_grad(set_to_none=True)
            step = self.rule.compute_grads(self.network, xb, target, state=state, generator=self.generator)
            if self.config.monitor_every and self.batches_seen % self.config.monitor_every == 0:
                self._monitor(step.free_state, target)
            self.optimizer.step()
            if self.particles is not None:
                for layer in self.network.free:
                    self.particles[layer][idx] = step.free_state[layer]
            correct += int((step.prediction == yb).sum())
            cost_sum += float(step.cost.sum())
            seen += len(yb)
            self.batches_seen += 1
            if self.progress:
                print(f"\repoch {epoch} [{i + 1}/{n_batches}] train acc {correct / seen:.4f}", end="",
                      file=sys.stderr, flush=True)
        if self.progress:
            print("\r", end="", file=sys.stderr)
        return correct / max(seen, 1), cost_sum / max(seen, 1), seen

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
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if rule.name == "backprop":
                prediction, _ = rule.predict(self.network, xb)
                output = rule.forward(self.network, xb)
            else:
                free, _ = relaxation.free(self.network, self.network.init_state(xb))
                output = free[self.network.driven]
                prediction = rule.cost.predict(output)
            target = rule.cost.encode(yb, self.dataset.n_classes, self.dtype)
            correct += int((prediction == yb).sum())
            cost_sum += float(rule.cost.value(output, target).sum())
        return correct / len(y), cost_sum / len(y)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; return the JSON-able summary."""
        self._prepare_out()
        start = time.perf_counter()
        examples = 0
        for epoch in range(1, self.config.epochs + 1):
            t0 = time.perf_counter()
            train_acc, train_cost, seen = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - t0
            examples += seen
            if self.scheduler is not None:
                self.scheduler.step()
            test_acc, test_cost = self.evaluate(self.x_test, self.y_test)
            metrics = EpochMetrics(epoch, train_acc, train_cost, test_acc, test_cost, time.perf_counter() - t0,
                                   seen / max(train_seconds, 1e-9))
            self.history.append(metrics)
            self.log(f"epoch {epoch:3d}  train acc {train_acc:.4f}  cost {train_cost:.4f}  test acc {test_acc:.4f}"
                     f"  cost {test_cost:.4f}  {metrics.seconds:.1f}s  {metrics.examples_per_second:.0f} ex/s")
            self._write_metrics()
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
        }
        self._finish_out(summary)
        return summary

    def _prepare_out(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(dump_toml(self.config))

    def _write_metrics(self) -> None:
        if self.out is None:
            return
        with open(self.out / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(EpochMetrics.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(m.__dict__ for m in self.history)
        if self.fidelity:
            with open(self.out / "fidelity.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(self.fidelity[0]))
                writer.writeheader()
                writer.writerows(self.fidelity)

    def _finish_out(self, summary: dict[str, Any]) -> None:
        if self.out is None:
            return
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            from earlyprop.plots import plot_fidelity, plot_training

            plot_training(self.history, self.out, title=f"{self.config.rule} on {self.config.data}")
            if self.fidelity:
                plot_fidelity(self.fidelity, self.out / "fidelity.png")
        except ImportError as exc:  # plotting is optional: matplotlib may be missing
            self.log(f"plots skipped: {exc}")


def train(config: TrainConfig, out: str | Path | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One call: load the data, build network and rule, fit, return the summary (jpc-style API)."""
    dataset = load_dataset(config.data, config.data_dir, validation=config.validation, seed=config.seed)
    if config.validation:
        dataset = _validation_as_test(dataset)
    kwargs = {"log": log} if log is not None else {}
    return Trainer(config, dataset, Path(out) if out else None, progress, **kwargs).fit()


def _validation_as_test(dataset: Dataset) -> Dataset:
    """Model selection on the validation split: it takes the test split's place (test stays unseen)."""
    return dataclasses.replace(dataset, x_test=dataset.x_val, y_test=dataset.y_val, x_val=None, y_val=None,
                               name=dataset.name + "[validation]")
