"""``earlyprop train``: train a layered energy-based network with the seed's STDP rule, EP or a reference.

With no arguments this is the main job: digits with the seed's rule, then the same net by
backprop, and a comparison table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RULE_CHOICES = ("stdp", "stdp-symmetric", "stdp-random-sign", "ep", "ep-negative", "ep-random-sign", "ep-symmetric",
                "bptt", "rbp", "backprop")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train on digits, MNIST, Fashion-MNIST, CIFAR-10 or an .npz file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML file of settings (flags given here override it)")
    p.add_argument("--data", help="digits (default), mnist, fashion-mnist, cifar10 or PATH.npz")
    p.add_argument("--data-dir", help="folder with the data files (default $EARLYPROP_DATA_DIR or ./data)")
    p.add_argument("--validation", type=float, help="hold out this many (or this fraction of) training examples "
                   "and report on them instead of the test set")
    p.add_argument("--rule", choices=RULE_CHOICES, help="learning rule (default stdp, the seed's rule)")
    p.add_argument("--stdp-form", choices=("plain", "xie_seung", "tied"), help="form of the STDP rule")
    p.add_argument("--hidden", type=_int_list, help="hidden layer sizes, e.g. 500 or 500,500 ('' for none after "
                   "--conv layers)")
    p.add_argument("--conv", help="convolutional layers before the hidden ones, channels:kernel[:pool[:padding]] "
                   "each, e.g. 32:5:max,64:5:max (pool max, avg or none; padding default kernel//2)")
    p.add_argument("--rho", choices=("hard_sigmoid", "sigmoid", "tanh"), help="rate nonlinearity")
    p.add_argument("--output-rho", choices=("hard_sigmoid", "sigmoid", "tanh", "linear"),
                   help="nonlinearity of the output layer (default: --rho; linear as in ER19-EB and SC23)")
    p.add_argument("--cost", choices=("squared_error", "cross_entropy"), help="cost on the output layer")
    p.add_argument("--init", choices=("glorot", "gaussian"), help="weight initialisation (default glorot)")
    p.add_argument("--gain", type=float, help="scale of the initial weights (multiplies the glorot bound, or the "
                   "gaussian std times sqrt(fan_in); default 0.25)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=_float_list, help="learning rate, one value or one per weight layer (input first)")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--scheduler", choices=("none", "cosine"))
    p.add_argument("--beta", type=float, help="nudging strength")
    p.add_argument("--eps", type=float, help="time step of the leaky integrator")
    p.add_argument("--free-steps", type=int)
    p.add_argument("--nudge-steps", type=int)
    p.add_argument("--eval-steps", type=int, help="free steps from rest when evaluating")
    p.add_argument("--solver", choices=("euler", "async"), help="euler: the leaky integrator; async: exact block "
                   "updates of even then odd layers (hard sigmoid, layered nets)")
    p.add_argument("--omega", type=float, help="over-relaxation of the async solver, in (0, 2): each layer moves "
                   "omega of the way to its minimiser (default 1; 1.3-1.7 needs far fewer sweeps to converge)")
    p.add_argument("--tol", type=float, help="stop a free phase (training and evaluation) once its residual "
                   "max|ds/dt| is <= TOL, checked every --check-every steps; the epoch log then reports the mean "
                   "steps a free phase took (default 0: run every step)")
    p.add_argument("--check-every", type=int, help="steps between the residual and finiteness checks (default 10; "
                   "each is one device read)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="run the relaxation of layered hard-sigmoid/linear nets on CPU in compiled kernels (numba, "
                   "when installed: pip install earlyprop[native]); same results, ~2x faster phases (default on)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, run the relaxation's stretches of steps between checks as CUDA graphs (one launch "
                   "each instead of a few per step; same results); no effect on CPU (default on)")
    p.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                   help="persistent particles: start each example's free phase where it last ended (EP17)")
    p.add_argument("--monitor-every", type=int, help="every N batches, log the cosine of the update with the "
                   "true gradient (recurrent backprop); 0 = off")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "float64"))
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision (autocast) for the relaxation "
                   "(parameters and states stay float32; default none)")
    p.add_argument("--out", type=Path, help="run directory for config, metrics.csv, plots and summary.json")
    p.add_argument("--force", action="store_true", help="allow writing into an existing, non-empty run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, help="write a checkpoint every N batches (and at each epoch "
                   "end); 0 = off (default)")
    p.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: relaxation is many small "
                   "products, and extra threads mostly add synchronisation; raise it for wide nets)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    return p


CONFIG_FLAGS = ("data", "data_dir", "validation", "rule", "stdp_form", "hidden", "conv", "rho", "output_rho", "cost",
                "init", "gain", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler",
                "beta", "eps", "free_steps", "nudge_steps", "eval_steps", "solver", "omega", "tol", "check_every",
                "native", "cuda_graphs", "persistent", "monitor_every", "seed", "dtype", "device", "amp",
                "checkpoint_every", "keep_checkpoints")


def run(args: argparse.Namespace) -> int:
    import torch

    from earlyprop.config import load_config
    from earlyprop.distributed import joined_group

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.validation is not None and args.validation >= 1:
        overrides["validation"] = float(int(args.validation))
    config = load_config(args.config, overrides)
    main_job = args.config is None and not overrides and not args.resume
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR (the run directory to continue)")
    with joined_group(config.device) as group:  # torchrun's process group, if started by torchrun
        if args.out is not None and not args.resume and group.is_main:
            _check_out(args.out, args.force)
        if args.resume and args.config is None and args.out is not None and (args.out / "config.toml").is_file():
            # the run's own settings, unless flags say otherwise
            config = load_config(args.out / "config.toml", overrides)
        summaries = _train(args, config, main_job)
        if not group.is_main:
            return 0
    _print_table(summaries)
    if args.json:
        print(json.dumps(summaries[0] if not main_job else {**summaries[0], "baseline": summaries[1]}))
    return 0


def _train(args: argparse.Namespace, config, main_job: bool) -> list[dict]:
    """The run's summary, and for the main job the backprop baseline's after it."""
    from earlyprop.config import load_config
    from earlyprop.train import train

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    summaries = [train(config, out=args.out, progress=progress, resume=args.resume)]
    if main_job:
        baseline = load_config(None, {"rule": "backprop"})
        print("\nthe same network trained by backprop (feed-forward MLP of the same sizes):", file=sys.stderr)
        summaries.append(train(baseline, out=args.out / "backprop" if args.out else None, progress=progress))
    return summaries


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"run directory {out} already exists and is not empty; pass --force to write into it "
                         "or choose another --out")


def _print_table(summaries: list[dict]) -> None:
    print(f"{'rule':<16}{'data':<10}{'sizes':<18}{'test acc':>10}{'train acc':>11}{'epochs':>8}{'seconds':>9}")
    for s in summaries:
        sizes = "-".join(str(n) for n in s["sizes"])
        print(f"{s['rule']:<16}{s['data']:<10}{sizes:<18}{s['test_accuracy']:>10.4f}{s['train_accuracy']:>11.4f}"
              f"{s['epochs']:>8d}{s['seconds']:>9.1f}")
