"""``earlyprop bench``: ms per training batch of the EP budgets of issue 4 against backprop and the FLOP floor.

Everything is measured in one process, so the ratios (EP/BP, EP/floor) compare like with like; the
library lives in :mod:`earlyprop.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from earlyprop.bench_configs import CONFIGS, DEFAULT_CONFIGS
from earlyprop.commands import json_safe

CONFIG_NAMES = tuple(CONFIGS)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="speed: ms per EP training batch vs backprop and the FLOP floor (issue 4)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Median ms per training batch (free + nudged phases + weight gradients) of four EP budgets:\n"
        "  A 784-500-10, batch 20, 20 free + 4 nudged Euler steps, one-sided EP (SB17/LA21)\n"
        "  B 784-500-10, batch 16, 15 free + 2x15 nudged, centered EP, asynchronous solver (RAIN23)\n"
        "  C 784-500-10, batch 20, Euler eps 0.2, 100 free + 12 nudged, ER19's leaky dynamics\n"
        "  D 784-500-500-500-10, batch 20, 500 free + 8 nudged (EP17's deepest net)\n"
        "  G 784-1024-1024-10, batch 256, 20 free + 4 nudged Euler steps eps 0.5, one-sided EP (the GPU budget;\n"
        "    not in the default set)\n"
        "  M 1x28x28 conv 32:5:max, 64:5:max - 10, batch 64, 30 free + 2x8 nudged Euler steps, centered EP\n"
        "    (configs/mnist-conv.toml; issue 6's conv benchmark, not in the default set)\n"
        "  N the same conv net, 8 + 2x3 sweeps of the block solver at omega 1.5 (configs/mnist-conv-async.toml)\n"
        "each next to a backprop step of the same MLP and its FLOP floor at the sgemm rate of this run.",
        epilog="example:\n  earlyprop bench\n  earlyprop bench --configs A,B --repeats 500 --json\n"
        "  earlyprop bench --device cuda --configs A,B,C,D,G,M --json-out bench.json")
    p.add_argument("--configs", type=_configs, default=list(DEFAULT_CONFIGS), metavar="A,B,...",
                   help="which configs to run, a subset of A,B,C,D,G,M,N (default A,B,C,D)")
    p.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                   help="timed batches per config (default 200 for A and B, 60 for C, 7 for D, 50 for G, 6 for M, "
                   "10 for N)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for float32 matmuls on CUDA (default off: plain fp32, as reported)")
    p.add_argument("--json-out", default=None, metavar="PATH",
                   help="also write the JSON report to PATH (the table still goes to stdout)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default 1: the published anchors are single-thread numbers)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-replicas", dest="replicas", action="store_false",
                   help="skip the anchors' replicas (earlyprop.replicas: LA21 for A, RAIN23 for B, ER19 for C), "
                   "which are timed beside our step by default")
    p.add_argument("--mnist-epoch", action="store_true",
                   help="also time one MNIST epoch of config A against a backprop epoch of the same MLP")
    p.add_argument("--data-dir", default="../shared/data", help="folder holding mnist/ (default ../shared/data)")
    p.add_argument("--solvers", action="store_true",
                   help="instead of timing: Euler steps against block sweeps (omega 1, 1.3, 1.5, 1.7) to a 1e-4 "
                   "residual on three batches of 20 MNIST training images, float64 (issue 4's solver check)")
    p.add_argument("--solver-nets", default="784-500-10,784-500-500-10", metavar="SIZES,...",
                   help="layer sizes for --solvers (default 784-500-10,784-500-500-10)")
    return p


def _configs(text: str) -> list[str]:
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in CONFIG_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"configs must be a comma-separated subset of {','.join(CONFIG_NAMES)}, "
                                         f"got {text!r}")
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch

    if (args.mnist_epoch or args.solvers) and not Path(args.data_dir).is_dir():  # fail before minutes of work
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} does not exist (needed by --mnist-epoch/--solvers)")
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json-out {args.json_out!r}: its folder does not exist")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.tf32 and device.type != "cuda":
        raise ValueError("--tf32 applies to CUDA devices only")
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(args.threads or 1)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    try:
        return _solvers(args) if args.solvers else _run(args, device)
    finally:  # in-process callers keep their own settings
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _solvers(args: argparse.Namespace) -> int:
    import torch

    from earlyprop.data import load_dataset, to_tensors
    from earlyprop.experiments.solver_convergence import count_iterations, format_counts
    from earlyprop.network import Network

    nets = [[int(n) for n in sizes.split("-")] for sizes in args.solver_nets.split(",")]
    x = to_tensors(load_dataset("mnist", data_dir=args.data_dir), dtype=torch.float64).x_train
    report: dict[str, Any] = {"solvers": {}}
    for sizes in nets:
        for start in (0, 20, 40):
            net = Network.layered(sizes, "hard_sigmoid", seed=0, dtype=torch.float64)
            rows = count_iterations(net, x[start:start + 20])
            name = f"{'-'.join(map(str, sizes))} images {start}:{start + 20}"
            report["solvers"][name] = [vars(r) for r in rows]
            if not args.json:
                print(format_counts(name, rows), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(json_safe(report), indent=1) + "\n")
    if args.json:
        print(json.dumps(json_safe(report)))
    return 0


def _run(args: argparse.Namespace, device) -> int:
    from earlyprop.bench import format_table, run_bench
    from earlyprop.bench_mnist import mnist_epoch

    def progress(text: str) -> None:
        print(f"earlyprop bench: {text}", file=sys.stderr, flush=True)

    report = run_bench(args.configs, device, args.repeats, progress=None if args.json else progress,
                       replicas=args.replicas)
    if args.mnist_epoch:
        progress("MNIST epoch of config A, EP then backprop")
        report["mnist_epoch"] = mnist_epoch(args.data_dir, device)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(json_safe(report), indent=1) + "\n")
    if args.json:
        print(json.dumps(json_safe(report)))
        return 0
    print(format_table(report))
    if "mnist_epoch" in report:
        e = report["mnist_epoch"]
        print(f"\nMNIST epoch, config A ({e['batches']} batches): EP {e['ep_seconds']:.2f} s "
              f"(test accuracy {e['ep_test_accuracy']:.4f}), backprop {e['bp_seconds']:.2f} s "
              f"(test accuracy {e['bp_test_accuracy']:.4f}); EP/BP {e['ratio']:.2f}")
    return 0
