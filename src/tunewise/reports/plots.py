"""PNG figures for the reports, drawn only from the data passed in (history.csv, JSON values).

Each function saves one PNG (dpi 110), closes its figure and returns the path. Files are
replaced atomically, like every other output of the workflow.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are rendered by batch jobs with no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 110
SIDE_COLOURS = {"baseline": "tab:blue", "optimized": "tab:orange"}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _series(history: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(step, values) of a column, with inf shown as a gap: a diverged epoch has no plottable value."""
    if column not in history.columns or "step" not in history.columns:
        return None
    values = pd.to_numeric(history[column], errors="coerce").replace([np.inf, -np.inf], np.nan)
    if values.notna().sum() == 0:
        return None
    steps = pd.to_numeric(history["step"], errors="coerce")
    return steps.to_numpy(dtype=float), values.to_numpy(dtype=float)


def _colour(label: str, index: int) -> str:
    return SIDE_COLOURS.get(label, f"C{index}")


def _maybe_log(ax, arrays: list[np.ndarray]) -> None:
    # losses spanning orders of magnitude hide the end of training on a linear axis
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 50:
        ax.set_yscale("log")


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_curves(history: pd.DataFrame, metric: str, best_step: int | None, path: Path, title: str = "") -> Path:
    """Train/val loss (learning rate on a twin axis) and train/val primary metric over steps."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = []
    for column, style in (("train/loss", "-"), ("val/loss", "--")):
        series = _series(history, column)
        if series:
            ax_loss.plot(*series, style, label=column, color="tab:blue" if column.startswith("train") else "tab:red")
            drawn.append(series[1])
    if drawn:
        _maybe_log(ax_loss, drawn)
    else:
        _no_data(ax_loss, "loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    handles = ax_loss.get_lines()
    lr = _series(history, "lr")
    if lr:
        ax_lr = ax_loss.twinx()
        handles += ax_lr.plot(*lr, ":", color="tab:gray", label="lr")
        ax_lr.set_ylabel("learning rate", color="tab:gray")
        # a constant rate would otherwise get a zoomed axis full of offset ticks
        ax_lr.set_ylim(0, max(lr[1]) * 1.1 if max(lr[1]) > 0 else 1)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if handles:  # one legend for both axes, so the two never overlap
        ax_loss.legend(handles, [h.get_label() for h in handles], loc="best")

    name = metric.split("/", 1)[-1]
    drawn = []
    for column, colour in ((f"train/{name}", "tab:blue"), (f"val/{name}", "tab:red")):
        series = _series(history, column)
        if series:
            ax_metric.plot(*series, "-" if column.startswith("train") else "--", color=colour, label=column)
            drawn.append(series)
    if drawn:
        ax_metric.legend(loc="best")
    else:
        _no_data(ax_metric, metric)
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(name)
    if best_step is not None:
        for ax in (ax_loss, ax_metric):
            ax.axvline(best_step, color="tab:green", alpha=0.6, linewidth=1)
        ax_metric.annotate(f"best step {best_step}", xy=(best_step, 0.02), xycoords=("data", "axes fraction"),
                           color="tab:green", fontsize=8, ha="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(histories: Mapping[str, pd.DataFrame], metric: str, path: Path,
                    best_steps: Mapping[str, int | None] | None = None, title: str = "") -> Path:
    """Validation primary metric and training loss of several runs (baseline vs optimized) over steps."""
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    losses = []
    for i, (label, history) in enumerate(histories.items()):
        colour = _colour(label, i)
        series = _series(history, metric)
        if series:
            ax_metric.plot(*series, color=colour, label=label)
            best = (best_steps or {}).get(label)
            if best is not None:
                hit = series[0] == best
                if hit.any():
                    ax_metric.plot(series[0][hit], series[1][hit], "o", color=colour)
        series = _series(history, "train/loss")
        if series:
            ax_loss.plot(*series, color=colour, label=label)
            losses.append(series[1])
    for ax, what in ((ax_metric, metric), (ax_loss, "train/loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        if ax.lines:
            ax.legend(loc="best")
        else:
            _no_data(ax, what)
    _maybe_log(ax_loss, losses)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_seed_scores(sides: Mapping[str, Sequence[float | None]], metric: str, path: Path, title: str = "") -> Path:
    """Per-seed values of each side: a box with every seed drawn on top of it."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(len(sides), 1), 4))
    labels = list(sides)
    for i, label in enumerate(labels):
        values = np.array([np.nan if v is None else float(v) for v in sides[label]], dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        if values.size > 1:
            ax.boxplot([values], positions=[i], widths=0.5, showfliers=False,
                       medianprops={"color": _colour(label, i)})
        # even spread rather than random jitter: the same files give the same picture
        offsets = np.linspace(-0.12, 0.12, values.size) if values.size > 1 else np.zeros(1)
        ax.plot(i + offsets, values, "o", color=_colour(label, i), alpha=0.85)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(metric)
    if not ax.lines:
        _no_data(ax, "seed values")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_overview(rows: Sequence[Mapping], path: Path) -> Path:
    """Baseline vs optimized mean (std error bars), one panel per experiment.

    rows: {"experiment", "metric", "baseline_mean", "baseline_std", "optimized_mean", "optimized_std"}.
    One panel each because experiments measure different metrics on different scales.
    """
    n = max(len(rows), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.6, 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for i, side in enumerate(("baseline", "optimized")):
            mean = row.get(f"{side}_mean")
            if mean is None or not np.isfinite(mean):
                continue
            std = row.get(f"{side}_std")
            ax.bar(i, mean, yerr=std if std is not None and np.isfinite(std) else None, capsize=4,
                   color=_colour(side, i), width=0.6)
        ax.set_xticks([0, 1], ["baseline", "optimized"])
        ax.set_title(row["experiment"], fontsize=9)
        ax.set_ylabel(row.get("metric") or "", fontsize=8)
        if not ax.patches:
            _no_data(ax, "result")
    if not rows:
        _no_data(axes[0][0], "experiment")
    fig.tight_layout()
    return _save(fig, path)
