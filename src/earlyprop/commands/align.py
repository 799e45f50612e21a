"""``earlyprop align``: early inference against back-propagation (THEORY §1.9, T4) and GDU (§3.3, T9).

Builds a random layered network, relaxes it to its free fixed point s*, then switches the nudge on and
reports, for every free layer, when it first moves and how well that first move matches -delta_k.
With ``--temperature T > 0`` it also runs the Langevin version (THEORY §1.12, T12): free and nudged
chains from s* that share the same noise (common random numbers), averaged over ``--repeats`` draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from earlyprop.commands import json_safe

RHOS = ("hard_sigmoid", "sigmoid", "tanh")
BOUNDED_RHOS = ("hard_sigmoid", "sigmoid")
DEFAULT_SIZES = "12,40,30,30,20,6"
BIAS_STD = 0.1
# layered() seeds its own generator with ``seed``; drawing x from that same stream would make the
# inputs equal the first rows of W_1 up to scale, so the data stream gets its own derived seed
DATA_SEED_OFFSET = 0x5EED
# The hard sigmoid has kinks at 0 and 1 and no fixed point outside (0, 1) without projection; small
# weights and fields centred at 0.5 keep (nearly) every unit in the linear region where rho' = 1
HARD_SIGMOID_GAIN = 0.2
HARD_SIGMOID_BIAS_MEAN = 0.5
# units beyond a kink decay towards 0 geometrically and turn subnormal (very slow) after ~3000 steps
HARD_SIGMOID_STEPS = 2000
SLOPE_BETA = 1e-3  # T4c's beta: large enough for round-off at eps = 0.025, k = 4, small enough for O(beta)
ROUNDOFF_ULPS = 1e3  # warn when a first change is within this many ulps of the state (rel. error ~1e-3 seen)
DEFAULT_REPEATS = 200  # THEORY T12's M
# the noise gets its own stream too (the same seed in a fresh generator would replay the weights' draws)
NOISE_SEED_OFFSET = 0x4015E


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "align", help="early inference vs back-propagation, layer by layer (T4), and GDU (T9)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Relax a random layered network to its free fixed point, switch the nudge on, and compare\n"
        "each layer's first move with -delta_k, the layered back-propagated error (Bengio & Fischer\n"
        "2015, THEORY 1.9). Also compares EP's per-step updates with BPTT gradients (GDU, Ernoult\n"
        "et al. 2019, THEORY 3.3). These results are always noise-free.\n\n"
        "With --temperature T > 0 it then runs the Langevin chains (noise variance 2*eps*T per step,\n"
        "THEORY 1.12, T12): free and nudged chains from s* share the same noise (common random\n"
        "numbers), --repeats M times, and per distance k it reports the first-change step, the cosine of\n"
        "the MEAN nudged-minus-free difference with -delta_k and the worst per-sample cosine. The noisy\n"
        "part measures early inference in expectation under noise (THEORY A12); single samples can\n"
        "be far from -delta_k once the noise dominates the O(beta*eps^(k+1)) signal.",
        epilog="example:\n  earlyprop align --sizes 12,40,30,30,20,6 --rho tanh --eps 0.2 --beta 1e-6 --json\n"
        "  earlyprop align --rho sigmoid --eps 0.05 --plot early_inference.png\n"
        "  earlyprop align --eps 0.1 --beta 1e-3 --temperature 1e-4 --repeats 200")
    p.add_argument("--sizes", type=_type(parse_sizes), default=parse_sizes(DEFAULT_SIZES), metavar="N,N,...",
                   help=f"layer sizes, input first, output last, >= 1 hidden layer (default {DEFAULT_SIZES})")
    p.add_argument("--rho", choices=RHOS, default="tanh", help="rate nonlinearity of every layer (default tanh)")
    p.add_argument("--eps", type=_type(_positive_float), default=0.2, help="Euler time step eps > 0 (default 0.2)")
    p.add_argument("--beta", type=_type(_nonzero_float), default=1e-6,
                   help="nudge strength, finite and != 0, either sign (default 1e-6)")
    p.add_argument("--temperature", type=_type(_nonnegative_float), default=0.0, metavar="T",
                   help="Langevin temperature T >= 0 (default 0). T > 0 adds the noise-averaged early inference "
                   "(common random numbers, THEORY T12) after the noise-free results, which it leaves unchanged")
    p.add_argument("--repeats", type=_type(_positive_int), default=DEFAULT_REPEATS, metavar="M",
                   help=f"noisy repeats M >= 1 averaged when T > 0 (default {DEFAULT_REPEATS})")
    p.add_argument("--nudge-scale", choices=("eps", "none"), default="eps",
                   help="nudge term eps*beta*dC/dy (EP17, 'eps') or beta*dC/dy (ER19, 'none') (default eps)")
    p.add_argument("--gdu-steps", type=_type(_positive_int), default=15, help="GDU time steps K (default 15)")
    p.add_argument("--batch", type=_type(_positive_int), default=4, help="random examples (default 4)")
    p.add_argument("--gain", type=_type(_positive_float), default=None,
                   help=f"weights ~ N(0, gain^2/fan_in) (default 1.0; {HARD_SIGMOID_GAIN} for hard_sigmoid, whose "
                   f"fields are also centred at {HARD_SIGMOID_BIAS_MEAN} to stay between its kinks)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and targets (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="float64 (default) resolves beta*eps^(k+1) down to ~1e-12; float32 needs a far larger beta")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of the travelling perturbation")
    return p


# ------------------------------------------------------------------------------------------ validation
def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"sizes must be comma-separated integers like {DEFAULT_SIZES}, got {text!r}") from None
    if len(sizes) < 3:
        raise ValueError(f"sizes needs >= 3 layers (input, >= 1 hidden, output), got {len(sizes)}: {text!r}")
    if min(sizes) < 1:
        raise ValueError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _number(text: str, cast=float, ok=lambda v: True, need: str = "") -> float:
    """Parse a finite number; ``ok`` is the extra condition, ``need`` says it in the error message."""
    kind = "an integer" if cast is int else "a finite number"
    try:
        value = cast(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"must be {kind}{need}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, ok=lambda v: v > 0, need=" > 0")


def _nonnegative_float(text: str) -> float:
    return _number(text, ok=lambda v: v >= 0, need=" >= 0")


def _nonzero_float(text: str) -> float:
    return _number(text, ok=lambda v: v != 0, need=" != 0 (beta = 0 is the free phase)")


def _positive_int(text: str) -> int:
    return int(_number(text, cast=int, ok=lambda v: v >= 1, need=" >= 1"))


def _type(check):
    """An argparse ``type`` from a checker raising ValueError (argparse hides ValueError messages)."""
    def convert(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.__name__
    return convert


def _validate(args: argparse.Namespace) -> None:
    """Re-check a Namespace built without the parser (in-process callers)."""
    checks = (("eps", _positive_float), ("beta", _nonzero_float), ("temperature", _nonnegative_float),
              ("gain", _positive_float), ("batch", _positive_int), ("gdu_steps", _positive_int),
              ("repeats", _positive_int))
    for name, check in checks:
        try:
            if getattr(args, name) is not None:  # gain None means the per-rho default
                check(str(getattr(args, name)))
        except ValueError as exc:
            raise ValueError(f"--{name.replace('_', '-')} {exc}") from None
    parse_sizes(",".join(str(n) for n in args.sizes))
    if args.plot and not Path(args.plot).parent.is_dir():  # fail before minutes of compute, not after
        raise FileNotFoundError(f"--plot: directory {str(Path(args.plot).parent)!r} does not exist")


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    _validate(args)
    import torch

    threads = torch.get_num_threads()
    if sum(args.sizes) <= 2000:  # tiny matrices: thread hand-off costs more than it saves (10x on a busy box)
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:  # in-process callers (tests, notebooks) keep their own setting
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import torch

    from earlyprop.dynamics import DivergenceError
    from earlyprop.experiments.early_inference import early_inference, eps_slopes, free_fixed_point
    from earlyprop.experiments.gdu import gdu
    from earlyprop.experiments.langevin import noise_averaged_alignment
    from earlyprop.network import Network

    dtype = getattr(torch, args.dtype)
    hard = args.rho == "hard_sigmoid"
    gain = args.gain if args.gain is not None else (HARD_SIGMOID_GAIN if hard else 1.0)
    net = Network.layered(args.sizes, args.rho, init="gaussian", gain=gain, bias_std=BIAS_STD, seed=args.seed,
                          dtype=dtype)
    if hard:
        with torch.no_grad():
            for b in net.biases:
                b.add_(HARD_SIGMOID_BIAS_MEAN)
    gen = torch.Generator().manual_seed(args.seed + DATA_SEED_OFFSET)
    shape_x, shape_d = (args.batch, args.sizes[0]), (args.batch, args.sizes[-1])
    # drawn in float64 and cast, so float32 and float64 runs see the same examples
    x = (torch.rand if hard else torch.randn)(shape_x, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.rand(shape_d, generator=gen, dtype=torch.float64)
    d = (d if args.rho in BOUNDED_RHOS else d - 0.5).to(dtype)

    # Newton needs a smooth rho and float64 to be worth it; float32 stops at its own resolution
    newton = dtype == torch.float64 and not hard
    tol = 1e-10 if dtype == torch.float64 else 100 * torch.finfo(dtype).eps
    try:
        state, res = free_fixed_point(net, x, tol=tol, newton=newton, steps=HARD_SIGMOID_STEPS if hard else 20000)
    except DivergenceError as exc:
        raise DivergenceError(f"free phase: {exc}; try a smaller --gain") from None
    result = early_inference(net, x, d, beta=args.beta, eps=args.eps, nudge_scale=args.nudge_scale, state=state)
    gdu_result = gdu(net, x, d, beta=args.beta, eps=args.eps, steps=args.gdu_steps, nudge_scale=args.nudge_scale,
                     state=state)
    slopes, slope_note = None, "not computed in float32: beta*eps^(k+1) falls below its resolution"
    if dtype == torch.float64:
        try:  # math.log raises ValueError for a layer that never moves
            slopes, slope_note = eps_slopes(net, x, d, beta=SLOPE_BETA, nudge_scale=args.nudge_scale, state=state), None
        except ValueError as exc:
            slope_note = f"not computed: {exc}"
    noisy = None
    if args.temperature > 0:
        try:
            noisy = noise_averaged_alignment(net, x, d, beta=args.beta, eps=args.eps, temperature=args.temperature,
                                             repeats=args.repeats, seed=args.seed + NOISE_SEED_OFFSET,
                                             nudge_scale=args.nudge_scale, state=state)
        except DivergenceError as exc:
            raise DivergenceError(f"noisy chains: {exc}; try a smaller --temperature") from None

    config = dict(sizes=list(args.sizes), rho=args.rho, eps=args.eps, beta=args.beta, temperature=args.temperature,
                  temperature_applied=args.temperature > 0, repeats=args.repeats,
                  noise_seed=args.seed + NOISE_SEED_OFFSET, nudge_scale=args.nudge_scale, gdu_steps=args.gdu_steps,
                  batch=args.batch, gain=gain, bias_std=BIAS_STD, bias_mean=HARD_SIGMOID_BIAS_MEAN if hard else 0.0,
                  init="gaussian", seed=args.seed, data_seed=args.seed + DATA_SEED_OFFSET, dtype=args.dtype,
                  newton=newton)
    warnings = _warnings(args, net, state, result, res, tol, dtype, noisy)
    report = _report(config, result, gdu_result, res, slopes, slope_note, warnings, noisy)
    if args.plot:  # before any stdout, so a bad path fails cleanly with nothing half-printed
        from earlyprop.plots import plot_early_inference

        report["plot"] = str(plot_early_inference(result, args.plot, sizes=args.sizes, rho=args.rho))
    print(json.dumps(json_safe(report)) if args.json else format_table(report))
    for w in warnings:
        print(f"earlyprop: warning: {w}", file=sys.stderr)
    return 0


def _warnings(args, net, state, result, res: float, tol: float, dtype, noisy=None) -> list[str]:
    import torch

    out = []
    if not res <= max(tol, 1e-8):
        out.append(f"the free phase did not reach a fixed point (residual {res:.2g}); results are approximate")
    if args.rho == "hard_sigmoid":
        outside = sum(int(((state[m] <= 0) | (state[m] >= 1)).sum()) for m in net.free)
        total = sum(state[m].numel() for m in net.free)
        if outside:
            out.append(f"{outside} of {total} unit states sit at or beyond the hard sigmoid's kinks (s* not in "
                       "(0, 1)), where early inference is not exact; a smaller --gain helps")
    ulp = torch.finfo(dtype).eps
    for col, layer in enumerate(result.layers):
        if layer.first_step < 0:
            out.append(f"layer {layer.layer} (distance {layer.distance}) never moved")
            continue
        units = state[layer.layer].numel()
        signal = float(result.change_norms[layer.first_step, col]) / math.sqrt(units)
        scale = max(1.0, float(state[layer.layer].norm()) / math.sqrt(units))
        if signal < ROUNDOFF_ULPS * ulp * scale:
            out.append(f"distance {layer.distance}: first change ~{signal:.1e} per unit is within "
                       f"{ROUNDOFF_ULPS:.0e} ulps of the state, so round-off limits its cosine and ratio; "
                       "raise |--beta|" + (" or use --dtype float64" if dtype != torch.float64 else ""))
    if noisy is not None:
        moved = {row.layer for row in noisy}
        for layer in result.layers:
            if layer.layer not in moved:
                out.append(f"layer {layer.layer} (distance {layer.distance}) never moved in the noisy chains")
        for row in noisy:
            if not math.isfinite(row.sample_cosine):
                out.append(f"distance {row.distance}: some noisy repeats did not move at step {row.first_step} "
                           "(round-off), so the per-sample cosine is undefined; raise |--beta|"
                           + (" or use --dtype float64" if dtype != torch.float64 else ""))
    return out


# ------------------------------------------------------------------------------------------ output
def _report(config, result, gdu_result, res, slopes, slope_note, warnings, noisy=None) -> dict[str, Any]:
    expected_slope = {k: k + (config["nudge_scale"] == "eps") for k in (slopes or {})}
    return {
        "layers": [
            {"distance": a.distance, "layer": a.layer, "name": "y" if a.distance == 0 else f"h{a.distance}",
             "units": config["sizes"][a.layer], "first_step": a.first_step, "expected_first_step": a.distance + 1,
             "cosine": a.cosine, "magnitude_ratio": a.magnitude_ratio,
             # keys are e in t = distance + e; e = 1 is the first step itself
             "later_cosines": {str(e): c for e, c in a.later_cosines.items()}}
            for a in result.layers
        ],
        "gdu": {**gdu_result.summary(), "steps": config["gdu_steps"],
                "tensors": {**gdu_result.neurons, **gdu_result.params}},
        "residual": res,
        "eps_slopes": {"beta": SLOPE_BETA, "slopes": {str(k): s for k, s in (slopes or {}).items()},
                       "expected": {str(k): e for k, e in expected_slope.items()}, "note": slope_note},
        # T12: null when T = 0; otherwise one row per layer that moved, each naming its T and M
        "noisy": None if noisy is None else [
            {"distance": r.distance, "layer": r.layer, "name": "y" if r.distance == 0 else f"h{r.distance}",
             "first_step": r.first_step, "expected_first_step": r.distance + 1, "mean_cosine": r.mean_cosine,
             "sample_cosine": r.sample_cosine, "temperature": config["temperature"], "repeats": config["repeats"]}
            for r in noisy
        ],
        "config": config,
        "warnings": warnings,
    }


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    offsets = sorted({int(e) for row in report["layers"] for e in row["later_cosines"] if int(e) > 1})
    later_head = "".join(f"{'cos t=k+' + str(e):>13}" for e in offsets)
    lines = [
        f"early inference: sizes {'-'.join(map(str, c['sizes']))}, rho={c['rho']}, eps={c['eps']:g}, "
        f"beta={c['beta']:g}, nudge_scale={c['nudge_scale']}, batch={c['batch']}, {c['dtype']}",
        "noise-free (T=0) chains, worst case over the batch; Δs = first change of the layer at distance k, "
        "δ = layered back-propagated error, c = " + ("eps" if c["nudge_scale"] == "eps" else "1"),
        "",
        f"{'k':>2} {'layer':>7} {'first step':>11} {'cos(Δs, -δ)':>16} {'|Δs|/(βcε^k|δ|)':>17}{later_head}",
    ]
    for row in report["layers"]:
        later = "".join(f"{row['later_cosines'].get(str(e), math.nan):>13.6f}" for e in offsets)
        step = f"{row['first_step']} ({row['expected_first_step']})"
        lines.append(f"{row['distance']:>2} {row['name'] + ' (' + str(row['layer']) + ')':>7} {step:>11} "
                     f"{row['cosine']:>16.12f} {row['magnitude_ratio']:>17.9f}{later}")
    lines.append("first step in parentheses: expected distance + 1 (one layer per step)")
    g = report["gdu"]
    lines += ["", f"GDU ({g['steps']} steps, EP increments vs -c·BPTT gradients, {len(g['tensors'])} tensors): "
              f"max rel. RMSE {g['max_rel_rmse']:.2e}, sign error {g['sign_error']:.2e}, "
              f"min cosine {g['min_cosine']:.12f}"]
    s = report["eps_slopes"]
    pairs = ", ".join(f"k={k}: {v:.4f} ({s['expected'][k]})" for k, v in s["slopes"].items())
    lines.append(f"eps-slopes of log|Δs| (T4c, beta={s['beta']:g}, expected in parentheses): {pairs}" if pairs
                 else f"eps-slopes: {s['note']}")
    lines.append(f"free fixed point: residual max|dE/ds| = {report['residual']:.2e}"
                 + (" (Newton-polished)" if c["newton"] else ""))
    if report.get("noisy") is not None:
        lines += ["", f"noise-averaged early inference (T12): T={c['temperature']:g}, {c['repeats']} repeats, free "
                  "and nudged chains share the noise (common random numbers); the expectation under noise (A12)",
                  f"{'k':>2} {'layer':>7} {'first step':>11} {'cos(mean Δs, -δ)':>18} {'worst sample cos':>17}"]
        for row in report["noisy"]:
            step = f"{row['first_step']} ({row['expected_first_step']})"
            lines.append(f"{row['distance']:>2} {row['name'] + ' (' + str(row['layer']) + ')':>7} {step:>11} "
                         f"{row['mean_cosine']:>18.12f} {row['sample_cosine']:>17.9f}")
        lines.append("mean: averaged over the repeats, worst example; sample: worst single repeat and example")
    if "plot" in report:
        lines.append(f"plot written to {report['plot']}")
    return "\n".join(lines)
