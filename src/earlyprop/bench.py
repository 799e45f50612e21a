"""The speed benchmark (issue 4): ms per training batch of four EP budgets, measured in one process.

For each config it reports the median ms of ``rule.compute_grads`` (free phase, nudged phase(s) and the
weight gradients written to ``.grad``), the median ms of a plain backprop step of the MLP with the same
sizes (torch.nn Linear + sigmoid, MSE, zero_grad + forward + backward + SGD step), and the config's FLOP
floor: the multiply-adds a lean implementation cannot avoid, converted to ms at the sgemm rate measured
in the same run. Element-wise work (O(batch x units) per step) is left out of the floor. Beside it, the same
products at the rates this machine's BLAS reaches for their own batch-sized shapes (the faster of the two layouts
of the right operand), measured in the same run: what the multiplies cost at that batch here, which on CPUs
whose large products run much faster than batch-20 ones is most of the gap to the floor.

On CUDA the same code runs on the device: each timed call is bracketed by ``torch.cuda.synchronize`` (nothing
inside it syncs but the library's own once-per-check and once-per-phase reads), after warm-up calls; the
sgemm rate is measured on the device in float32, with the TF32 setting reported beside it. Config G
(784-1024-1024-10, batch 256, config A's phases) is issue 4's GPU budget.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from earlyprop.bench_configs import CONFIGS, BenchConfig, floor_products, flop_floor, sgemm_shape, small_shapes
from earlyprop.machine import machine_info

if TYPE_CHECKING:
    from earlyprop.network import Network
    from earlyprop.rules import LearningRule

# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup(device: torch.device) -> int:
    """Untimed calls before timing: on a GPU the first calls also load kernels and grow the allocator's pool."""
    return 5 if device.type == "cuda" else 2


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device,
               reset: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock ms of ``fn`` per call (``reset`` runs between calls, untimed). On CUDA the device is
    synchronised right before and right after each call, so a call's time includes all its device work."""
    for _ in range(warmup):
        fn()
        if reset:
            reset()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - start) * 1e3)
        if reset:
            reset()
    return out


def sgemm_gflops(shape: Sequence[int], device: torch.device, repeats: int = 15, transposed: bool = True) -> float:
    """Median float32 GFLOP/s of an (m x k) @ (k x n) product (TF32 only if the caller enabled it), its right
    operand an (n x k) matrix transposed (as ``x @ W.T``), or with ``transposed=False`` a (k x n) one."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(m, k, generator=gen).to(device)
    w = torch.rand(n, k, generator=gen).to(device).t()
    w = w.contiguous() if not transposed else w
    out = torch.empty(m, n, device=device)
    # small products: time a loop, not the timer (on a GPU: enough launches to hide the synchronize, at most 256)
    budget, cap = (2e9, 256) if device.type == "cuda" else (2e7, 10**6)
    inner = max(1, min(cap, int(budget // (m * k * n))))
    ms = time_calls(lambda: [torch.mm(a, w, out=out) for _ in range(inner)], repeats, warmup(device), device)
    return 2.0 * m * k * n * inner / (statistics.median(ms) * 1e-3) / 1e9


def make_rho(name: str):
    from earlyprop.nonlinearity import Sigmoid, get_nonlinearity

    return Sigmoid(gain=4.0, shift=0.5) if name == "sigmoid4" else get_nonlinearity(name)


def build_ep(cfg: BenchConfig, device: torch.device, seed: int = 0):
    """The network (float32, Glorot) and the EP rule of ``cfg``."""
    from earlyprop.network import Network
    from earlyprop.rules import EquilibriumProp, Relaxation

    if cfg.conv:
        from earlyprop.conv import conv_network

        net = conv_network(cfg.image, cfg.conv, [], cfg.sizes[-1], make_rho(cfg.rho), gain=cfg.gain, seed=seed,
                           dtype=torch.float32).to(device)
    else:
        net = Network.layered(cfg.sizes, make_rho(cfg.rho), seed=seed, dtype=torch.float32).to(device)
    relaxation = Relaxation(eps=cfg.eps, free_steps=cfg.free_steps, nudge_steps=cfg.nudge_steps, project=cfg.project,
                            nudge_scale=cfg.nudge_scale, method=cfg.method, omega=cfg.omega)
    return net, EquilibriumProp(cfg.beta, cfg.variant, relaxation)


def make_mlp(sizes: Sequence[int], device: torch.device, seed: int = 0, cfg: BenchConfig | None = None
             ) -> torch.nn.Sequential:
    """The backprop baseline: Linear + sigmoid layers, or for a conv config the CNN with the same layers."""
    torch.manual_seed(seed)
    if cfg is not None and cfg.conv:
        return make_cnn(cfg).to(device)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers).to(device)


def make_cnn(cfg: BenchConfig) -> torch.nn.Sequential:
    from earlyprop.conv import parse_conv_specs

    layers: list[torch.nn.Module] = [torch.nn.Unflatten(1, cfg.image)]
    channels = cfg.image[0]
    for spec in parse_conv_specs(list(cfg.conv)):
        pad = spec.kernel // 2 if spec.padding is None else spec.padding
        layers += [torch.nn.Conv2d(channels, spec.channels, spec.kernel, padding=pad)]
        layers += {"max": [torch.nn.MaxPool2d(2)], "avg": [torch.nn.AvgPool2d(2)], "none": []}[spec.pool]
        layers += [torch.nn.Sigmoid()]
        channels = spec.channels
    layers += [torch.nn.Flatten(), torch.nn.Linear(cfg.sizes[-2], cfg.sizes[-1]), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


def relaxation_twin(rule: LearningRule, **changes) -> LearningRule:
    """``rule`` with its relaxation's settings changed: ``native=False`` (the torch loops), ``cuda_graphs=False``."""
    import copy

    twin = copy.copy(rule)
    twin.relaxation = replace(rule.relaxation, **changes)
    return twin


def lean_chain(net: Network, x: torch.Tensor):
    """The lean chain relax would run ``net``'s phases in for inputs like ``x`` (None: the general loop)."""
    from earlyprop.chain import Chain

    with torch.no_grad():
        state = net.init_state(x)
        return Chain.of(net, state, net.static_fields(state))


def random_batches(cfg: BenchConfig, device: torch.device, count: int = 8, seed: int = 1) -> list:
    """Inputs uniform in [0, 1] and random one-hot targets, float32."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(cfg.batch, cfg.sizes[0], generator=gen)
        y = torch.nn.functional.one_hot(torch.randint(0, cfg.sizes[-1], (cfg.batch,), generator=gen),
                                        cfg.sizes[-1]).float()
        out.append((x.to(device), y.to(device)))
    return out


class Runner:
    """One config's timed callables: the EP step (``compute_grads``) and the backprop step of the same MLP."""

    def __init__(self, cfg: BenchConfig, device: torch.device, replica: bool = True):
        from earlyprop.replicas import build_replica

        self.cfg, self.device = cfg, device
        self.batches = random_batches(cfg, device)
        self.net, self.rule = build_ep(cfg, device)
        # where the compiled kernels run this config's phases, the torch loops too, for their speedup in this run;
        # on CUDA, where the lean chain runs, the same step without CUDA graphs (the default runs them)
        chain = lean_chain(self.net, self.batches[0][0])
        self.torch_rule = relaxation_twin(self.rule, native=False) if chain and chain.native else None
        self.no_graphs_rule = relaxation_twin(self.rule, cuda_graphs=False) if chain and device.type == "cuda" else None
        self.torch_ms: list[float] = []
        self.no_graphs_ms: list[float] = []
        self.replica = build_replica(cfg, self.net) if replica else None
        self.replica_ms: list[float] = []
        self.mlp = make_mlp(cfg.sizes, device, cfg=cfg)
        self.opt = torch.optim.SGD(self.mlp.parameters(), lr=0.1)
        self.count = 0
        self.ep: list[float] = []
        self.bp: list[float] = []
        self.bp_grads_only: list[float] = []

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.count += 1
        return self.batches[self.count % len(self.batches)]

    def ep_step(self) -> None:
        self.rule.compute_grads(self.net, *self._batch())

    def zero(self) -> None:  # what an optimizer's zero_grad(set_to_none=True) does, untimed
        for p in self.net.parameters():
            p.grad = None

    def bp_grads(self) -> None:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        (0.5 * ((self.mlp(x) - y) ** 2).sum(-1).mean()).backward()

    def bp_step(self) -> None:
        self.bp_grads()
        self.opt.step()

    def torch_step(self) -> None:
        self.torch_rule.compute_grads(self.net, *self._batch())

    def no_graphs_step(self) -> None:
        self.no_graphs_rule.compute_grads(self.net, *self._batch())

    def replica_step(self) -> None:
        self.replica.compute_grads(*self._batch())

    def measure(self, count: int, warmup: int = 0) -> None:
        self.ep += time_calls(self.ep_step, count, warmup, self.device, reset=self.zero)
        self.bp += time_calls(self.bp_step, count, warmup, self.device)
        self.bp_grads_only += time_calls(self.bp_grads, count, warmup, self.device)
        if self.torch_rule is not None:
            self.torch_ms += time_calls(self.torch_step, count, warmup, self.device, reset=self.zero)
        if self.no_graphs_rule is not None:
            self.no_graphs_ms += time_calls(self.no_graphs_step, count, warmup, self.device, reset=self.zero)
        if self.replica is not None:
            self.replica_ms += time_calls(self.replica_step, count, warmup, self.device, reset=self.zero)

    def result(self) -> dict[str, Any]:
        replica = statistics.median(self.replica_ms) if self.replica_ms else None
        torch_ms = statistics.median(self.torch_ms) if self.torch_ms else None
        no_graphs_ms = statistics.median(self.no_graphs_ms) if self.no_graphs_ms else None
        return {"ms_per_batch": statistics.median(self.ep), "ep_ms_min": min(self.ep),
                "bp_ms_per_batch": statistics.median(self.bp), "bp_grads_ms": statistics.median(self.bp_grads_only),
                "replica_ms_per_batch": replica,
                "speedup_vs_replica": replica / statistics.median(self.ep) if replica else None,
                "torch_loops_ms_per_batch": torch_ms,
                "native_speedup": torch_ms / statistics.median(self.ep) if torch_ms else None,
                "no_graphs_ms_per_batch": no_graphs_ms,
                "cuda_graphs_speedup": no_graphs_ms / statistics.median(self.ep) if no_graphs_ms else None,
                "repeats": len(self.ep)}


def run_bench(names: Sequence[str], device: torch.device, repeats: int | None = None, rounds: int = 10,
              progress: Callable[[str], None] | None = None, replicas: bool = True) -> dict[str, Any]:
    """The whole benchmark in this process; returns the report.

    The measurements are interleaved: each of ``rounds`` rounds times a share of every config's EP and
    backprop batches (and, with ``replicas``, of its anchor's replica, :mod:`earlyprop.replicas`) and the sgemm
    rate and the batch-sized products' rates, so that a burst of load on a shared machine hits all of them alike and
    the ratios (EP/BP, EP/floor, EP/prod, replica/EP) stay meaningful; medians are over all batches and rounds.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runners = {name: Runner(CONFIGS[name], device, replicas) for name in names}
    counts = {name: repeats or CONFIGS[name].repeats for name in names}
    rounds = max(1, min(rounds, *counts.values()))
    big, rates = sgemm_shape(device), []
    shapes, small_rates = small_shapes([runner.cfg for runner in runners.values()]), []
    for r in range(rounds):
        rates.append(sgemm_gflops(big, device, repeats=3 if r else 5))
        small_rates.append({s: max(sgemm_gflops(s, device, repeats=5), sgemm_gflops(s, device, 5, transposed=False))
                            for s in shapes})  # the faster layout of each shape
        for name, runner in runners.items():
            if progress and r == 0:
                cfg = runner.cfg
                progress(f"config {name}: {'-'.join(map(str, cfg.sizes))}, batch {cfg.batch}, {cfg.phases()}")
            runner.measure(max(1, -(-counts[name] // rounds)), warmup=warmup(device) + 1 if r == 0 else 0)
    gflops = statistics.median(rates)
    small = {s: statistics.median(measured[s] for measured in small_rates) for s in shapes}
    configs = {}
    for name, runner in runners.items():
        cfg, row = runner.cfg, runner.result()
        floor = flop_floor(cfg)
        row["flop_floor_mflop"] = floor / 1e6
        row["flop_floor_ms"] = floor / (gflops * 1e9) * 1e3
        row["ratio_to_floor"] = row["ms_per_batch"] / row["flop_floor_ms"]
        row["products_ms"] = None if cfg.conv else sum(
            2.0 * m * k * n * count / (small[m, k, n] * 1e9) * 1e3 for (m, k, n), count in floor_products(cfg))
        row["ratio_to_products"] = row["ms_per_batch"] / row["products_ms"] if row["products_ms"] else None
        row["ratio_to_bp"] = row["ms_per_batch"] / row["bp_ms_per_batch"]
        row["anchor"], row["anchor_ms"] = cfg.anchor, cfg.anchor_ms
        row["speedup_vs_anchor"] = cfg.anchor_ms / row["ms_per_batch"] if cfg.anchor_ms else None
        row["network"], row["batch"], row["phases"] = "-".join(map(str, cfg.sizes)), cfg.batch, cfg.phases()
        configs[name] = row
    machine = machine_info(device)
    machine["sgemm_shape"] = "x".join(map(str, big))
    machine["sgemm_gflops_per_round"] = rates
    machine["small_sgemm_gflops"] = {"x".join(map(str, s)): rate for s, rate in small.items()}
    machine["rounds"] = rounds
    return {"configs": configs, "machine": machine, "matmul_gflops": gflops}


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = f" ({m['gpu']}, CUDA {m.get('cuda')}, TF32 matmul {'on' if m.get('tf32_matmul') else 'off'})" \
        if "gpu" in m else ""
    small = ", ".join(f"{k}: {v:.0f}" for k, v in m["small_sgemm_gflops"].items())
    lines = [
        f"earlyprop bench: {m['device']}{gpu}, {m['cpu']}, torch {m['torch']}, {m['threads']} thread(s), "
        f"numba {m.get('numba') or 'absent (torch loops only)'}, small_gemm {m.get('small_gemm')}",
        f"sgemm {m['sgemm_shape']} fp32: {report['matmul_gflops']:.1f} GFLOP/s (floors use this rate); "
        f"batch-sized products {small} GFLOP/s",
        "",
        f"{'cfg':<3} {'network':<20} {'batch':>5}  {'phases':<30} {'EP ms':>8} {'BP ms':>7} {'EP/BP':>6} "
        f"{'MFLOP':>8} {'floor ms':>8} {'EP/floor':>8} {'prod ms':>8} {'EP/prod':>7}  {'anchor':<12} "
        f"{'speedup':>7} {'replica ms':>10} {'speedup':>7} {'torch ms':>8} {'native':>6} {'no-graph ms':>11} "
        f"{'graphs':>6}",
    ]
    for name, r in report["configs"].items():
        anchor = f"{r['anchor']} {r['anchor_ms']:g}" if r["anchor"] else "-"
        speedup = f"{r['speedup_vs_anchor']:.1f}x" if r["speedup_vs_anchor"] else "-"
        replica = f"{r['replica_ms_per_batch']:.3f}" if r.get("replica_ms_per_batch") else "-"
        same_run = f"{r['speedup_vs_replica']:.1f}x" if r.get("speedup_vs_replica") else "-"
        loops = f"{r['torch_loops_ms_per_batch']:.3f}" if r.get("torch_loops_ms_per_batch") else "-"
        compiled = f"{r['native_speedup']:.2f}x" if r.get("native_speedup") else "-"
        ungraphed = f"{r['no_graphs_ms_per_batch']:.3f}" if r.get("no_graphs_ms_per_batch") else "-"
        graphs_gain = f"{r['cuda_graphs_speedup']:.2f}x" if r.get("cuda_graphs_speedup") else "-"
        products, to_products = (f"{r['products_ms']:.3f}", f"{r['ratio_to_products']:.2f}") \
            if r.get("products_ms") else ("-", "-")
        lines.append(
            f"{name:<3} {r['network']:<20} {r['batch']:>5}  {r['phases']:<30} {r['ms_per_batch']:>8.3f} "
            f"{r['bp_ms_per_batch']:>7.3f} {r['ratio_to_bp']:>6.2f} {r['flop_floor_mflop']:>8.1f} "
            f"{r['flop_floor_ms']:>8.3f} {r['ratio_to_floor']:>8.2f} {products:>8} {to_products:>7}  "
            f"{anchor:<12} {speedup:>7} {replica:>10} {same_run:>7} {loops:>8} {compiled:>6} {ungraphed:>11} "
            f"{graphs_gain:>6}")
    lines += ["", "EP ms: median of rule.compute_grads (free + nudged phases + .grad); BP ms: median of zero_grad + "
              "forward + backward + SGD step of the same MLP (Linear + sigmoid); floor ms: the FLOP floor at the large "
              "sgemm's rate; prod ms: the floor's products at the rate of their own batch-sized shapes (the "
              "faster layout of each, measured in this run; '-' for conv configs); anchor: the public code's ms per "
              "batch on issue 4's machine, 1 thread, and our speedup over it; replica ms: the anchor's training "
              "step rewritten in earlyprop.replicas (its ops, the same gradient), timed in this run, and our "
              "speedup over it; torch ms: the same EP step with the torch loops instead of the compiled kernels "
              "(earlyprop.native; '-' where they do not run), and the kernels' speedup; no-graph ms: on CUDA, the "
              "same EP step with Relaxation(cuda_graphs=False), its steps launched one by one instead of replayed "
              "as CUDA graphs (earlyprop.cuda_graphs; '-' off CUDA or where the lean chain does not run), and the "
              "graphs' speedup"]
    return "\n".join(lines)
