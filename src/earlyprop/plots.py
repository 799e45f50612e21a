"""Figures written to PNG files (matplotlib, headless Agg backend).

matplotlib is imported inside each function: importing earlyprop must not need a display or pay
matplotlib's start-up cost. Add one ``plot_<experiment>(result, path, ...) -> Path`` per experiment
and share the helpers at the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from earlyprop.experiments.early_inference import EarlyInferenceResult

EXACT_FLOOR = 1e-16  # where a cosine of exactly 1 is drawn on a log scale of 1 - cos
ALIGNMENT_THRESHOLD = 1e-8  # THEORY T4b pass criterion, drawn for reference


# ------------------------------------------------------------------------------------------ early inference
def plot_early_inference(
    result: EarlyInferenceResult,
    path: str | Path,
    *,
    sizes: Sequence[int] | None = None,
    rho: str | None = None,
) -> Path:
    """Two panels from an :func:`~earlyprop.experiments.early_inference.early_inference` result.

    Left: ||s^beta_t - s^0_t|| per layer on a log scale; exact zeros are left out, so each curve starts
    where the perturbation reaches its layer (a dot marks the expected first step k + 1) and the wave
    travels down one layer per step. Right: 1 - cos(s^beta_t - s^0_t, -delta_k) on a log scale, which
    resolves both the near-exact first-step alignment (~1e-12) and its slow decay afterwards.
    """
    plt = _pyplot()
    norms = result.change_norms.double().numpy()
    cosines = result.cosines.double().numpy()
    steps = range(norms.shape[0])
    colours = plt.get_cmap("viridis")(_spread(len(result.layers)))
    fig, (ax_n, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    stored_floor = _resolution(result.cosines)
    for col, (layer, colour) in enumerate(zip(result.layers, colours)):
        k = layer.distance
        label = f"k={k}" + (" (output)" if k == 0 else f" (layer {layer.layer})")
        moved = norms[:, col] > 0
        ax_n.plot([t for t in steps if moved[t]], norms[moved, col], "-", color=colour, label=label, lw=1.6)
        if 0 <= k + 1 < len(norms) and norms[k + 1, col] > 0:
            ax_n.plot(k + 1, norms[k + 1, col], "o", color=colour, ms=7, mec="black", mew=0.8, zorder=3)
        # the stored curve may be float32; the first step's cosine is kept at full precision, and it is
        # the point of the figure (~1e-12 in float64), so it replaces the stored value there
        gap = {t: max(1.0 - float(cosines[t, col]), stored_floor) for t in steps if math.isfinite(cosines[t, col])}
        if layer.first_step >= 0 and math.isfinite(layer.cosine):
            gap[layer.first_step] = max(1.0 - layer.cosine, EXACT_FLOOR)
            ax_c.plot(layer.first_step, gap[layer.first_step], "o", color=colour, ms=7, mec="black", mew=0.8,
                      zorder=3)
        ax_c.plot(sorted(gap), [gap[t] for t in sorted(gap)], "-", color=colour, label=label, lw=1.6)
    ax_n.set_yscale("log")
    ax_n.set_xlabel("step t after the nudge is switched on")
    ax_n.set_ylabel(r"$\|s^\beta_t - s^0_t\|$ (layer at distance $k$)")
    ax_n.set_title("the perturbation travels one layer per step\n(dot: expected first step $t = k+1$)",
                   fontsize=10)
    ax_c.set_yscale("log")
    ax_c.set_xlabel("step t after the nudge is switched on")
    ax_c.set_ylabel(r"$1 - \cos(s^\beta_t - s^0_t,\ -\delta_k)$")
    ax_c.set_title(r"alignment with the back-propagated error $-\delta_k$" + "\n"
                   f"(dot: first step; later steps resolved to {stored_floor:.0e})", fontsize=10)
    ax_c.axhline(ALIGNMENT_THRESHOLD, color="grey", ls=":", lw=1)
    ax_c.text(len(norms) - 1, ALIGNMENT_THRESHOLD, "T4b: 1 - cos <= 1e-8 at the first step", ha="right",
              va="bottom", fontsize=8, color="grey")
    for ax in (ax_n, ax_c):
        _integer_steps(ax, len(norms))
        ax.grid(True, which="major", alpha=0.3)
    ax_n.legend(fontsize=8, loc="best")
    fig.suptitle(_title(result, sizes, rho), fontsize=11)
    return _save(fig, path)


def _resolution(values: Any) -> float:
    """The smallest 1 - cos that the stored dtype resolves: a few ulps (float32 storage gives ~1e-6)."""
    import torch

    return 10 * torch.finfo(values.dtype).eps if values.is_floating_point() else 1e-15


def _title(result: EarlyInferenceResult, sizes: Sequence[int] | None, rho: str | None) -> str:
    parts = []
    if sizes is not None:
        parts.append("sizes " + "-".join(str(n) for n in sizes))
    if rho is not None:
        parts.append(f"rho={rho}")
    parts += [f"eps={result.eps:g}", f"beta={result.beta:g}", f"nudge_scale={result.nudge_scale}"]
    return "Early inference vs back-propagation: " + ", ".join(parts)


# ------------------------------------------------------------------------------------------ shared helpers
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: works on servers and in tests without a display
    import matplotlib.pyplot as plt

    return plt


def _spread(n: int) -> list[float]:
    """n colour-map positions, avoiding viridis' pale yellow end that vanishes on white."""
    return [0.0] if n <= 1 else [0.85 * i / (n - 1) for i in range(n)]


def _integer_steps(ax: Any, n_steps: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.3, n_steps - 0.7)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        fig.savefig(path, dpi=150)
    finally:
        plt.close(fig)  # figures pile up in long runs (training curves) otherwise
    return path


def plot_training(history: Sequence[Any], out: str | Path, *, title: str = "") -> list[Path]:
    """accuracy.png and cost.png: train and test curves per epoch (``EpochMetrics`` rows)."""
    out = Path(out)
    epochs = [m.epoch for m in history]
    paths = []
    for name, train_key, test_key in (("accuracy", "train_accuracy", "test_accuracy"),
                                      ("cost", "train_cost", "test_cost")):
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(epochs, [getattr(m, train_key) for m in history], marker="o", ms=3, label="train (during training)")
        ax.plot(epochs, [getattr(m, test_key) for m in history], marker="s", ms=3, label="test (free relaxation)")
        if name == "accuracy":
            ax.set_ylim(top=1.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(title or name)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / f"{name}.png"))
    return paths


def plot_fidelity(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Per-parameter cosine between the rule's update and the true gradient over training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["batch"] for r in rows]
    names = [k for k in rows[0] if k != "batch"]
    for name in names:
        ax.plot(batches, [r[name] for r in rows], label=name)
    ax.set_xlabel("batch")
    ax.set_ylabel("cos(update, true gradient)")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title("gradient fidelity (reference: recurrent backprop)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
