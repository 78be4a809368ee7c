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
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tunewise.runs import finite_float, read_history  # noqa: E402

DPI = 110
SIDE_COLOURS = {"baseline": "tab:blue", "optimized": "tab:orange"}


def save_figure(fig, path: Path) -> Path:
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


def column_series(history: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray] | None:
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
        series = column_series(history, column)
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
    lr = column_series(history, "lr")
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
        series = column_series(history, column)
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
    return save_figure(fig, path)


def plot_comparison(histories: Mapping[str, pd.DataFrame], metric: str, path: Path,
                    best_steps: Mapping[str, int | None] | None = None, title: str = "") -> Path:
    """Validation primary metric and training loss of several runs (baseline vs optimized) over steps."""
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    losses = []
    for i, (label, history) in enumerate(histories.items()):
        colour = _colour(label, i)
        series = column_series(history, metric)
        if series:
            ax_metric.plot(*series, color=colour, label=label)
            best = (best_steps or {}).get(label)
            if best is not None:
                hit = series[0] == best
                if hit.any():
                    ax_metric.plot(series[0][hit], series[1][hit], "o", color=colour)
        series = column_series(history, "train/loss")
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


# --- sweep plots (input: the sweep.json summary; trial curves from each trial's history.csv) ---------

SWEEP_STATE_STYLE = {  # state -> (marker, colour, label)
    "COMPLETE": ("o", "tab:blue", "complete"),
    "PRUNED": ("x", "tab:gray", "pruned (last reported)"),
    "FAIL": ("v", "tab:red", "failed (no value: along the bottom)"),
}


def _sweep_value(trial: Mapping) -> float | None:
    return finite_float(trial.get("value"))


def _sweep_params(sweep: Mapping) -> list[str]:
    keys = list(sweep.get("space") or {})
    for trial in sweep.get("trials") or []:
        keys += [k for k in trial.get("params") or {} if k not in keys]
    return keys


def _sweep_sign(sweep: Mapping) -> int:
    return 1 if (sweep.get("metric") or {}).get("direction", "max") == "max" else -1


def _is_best(sweep: Mapping, trial: Mapping) -> bool:
    best = sweep.get("best") or {}
    for key in ("slot", "number"):
        if best.get(key) is not None and trial.get(key) is not None:
            return trial[key] == best[key]
    return False


def _panels(n: int, width: float = 4.0, height: float = 3.2):
    cols = min(3, max(n, 1))
    rows = -(-max(n, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[max(n, 1):]:
        ax.axis("off")
    return fig, flat


def _param_x(spec: Mapping, values: Sequence) -> tuple[list[float | None], list | None]:
    """x positions of parameter values; categorical choices sit at 0..n-1, labelled with the choice."""
    if spec.get("type") == "categorical":
        choices = list(spec.get("choices") or [])
        for v in values:
            if v is not None and v not in choices:
                choices.append(v)
        return [choices.index(v) if v is not None else None for v in values], choices
    out = []
    for v in values:
        try:
            out.append(float(v) if v is not None else None)
        except (TypeError, ValueError):
            out.append(None)
    return out, None


def _param_axis(ax, key: str, spec: Mapping, choices: list | None, xs: Sequence[float | None]) -> None:
    ax.set_xlabel(key)
    if choices is not None:
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
        ax.set_xlim(-0.5, len(choices) - 0.5)
    else:
        log = bool(spec.get("log")) and all(x is None or x > 0 for x in xs)
        if log:
            ax.set_xscale("log")
            # ranges under a decade would otherwise get overlapping labels on the minor ticks
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        low, high = spec.get("low"), spec.get("high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high > low and (low > 0 or not log):
            # the whole search range, so a best trial at its edge (the boundary check) is visible
            if log:
                pad = (high / low) ** 0.03
                ax.set_xlim(low / pad, high * pad)
            else:
                pad = 0.03 * (high - low)
                ax.set_xlim(low - pad, high + pad)


def plot_param_axes(sweep: Mapping, path: Path) -> Path:
    """One panel per swept parameter: the trial's primary value against the parameter value.

    Complete trials are dots, pruned ones crosses at their last reported value, failed ones red triangles
    along the bottom edge (they have no value), the best trial a star. Log parameters get a log x axis.
    """
    metric = (sweep.get("metric") or {}).get("name", "value")
    space = sweep.get("space") or {}
    keys = _sweep_params(sweep)
    trials = list(sweep.get("trials") or [])
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        spec = space.get(key) or {}
        xs, choices = _param_x(spec, [(t.get("params") or {}).get(key) for t in trials])
        for state, (marker, colour, label) in SWEEP_STATE_STYLE.items():
            points = [(x, _sweep_value(t)) for x, t in zip(xs, trials) if x is not None and t.get("state") == state]
            with_value = [(x, y) for x, y in points if y is not None]
            without = [x for x, y in points if y is None]
            if with_value:
                ax.plot(*zip(*with_value), marker, color=colour, label=label, alpha=0.8, linestyle="none")
            if without:  # no value to place: x in data units, y along the bottom edge of the axes
                ax.plot(without, [0.03] * len(without), marker, color=colour, transform=ax.get_xaxis_transform(),
                        label=None if with_value else label, linestyle="none")
        best = [(x, _sweep_value(t)) for x, t in zip(xs, trials) if x is not None and _is_best(sweep, t)]
        best = [(x, y) for x, y in best if y is not None]
        if best:
            ax.plot(*zip(*best), "*", color="gold", markeredgecolor="black", markersize=15, label="best",
                    linestyle="none")
        _param_axis(ax, key, spec, choices, xs)
        ax.set_ylabel(metric)
        if not ax.lines:
            _no_data(ax, "trial")
    if keys:
        axes[0].legend(loc="best", fontsize=7)
    else:
        _no_data(axes[0], "swept parameter")
    fig.suptitle(f"sweep: {metric} against each parameter")
    fig.tight_layout()
    return save_figure(fig, path)


def _bin_edges(spec: Mapping, xs: np.ndarray, n_complete: int) -> np.ndarray | None:
    low, high = spec.get("low"), spec.get("high")
    low = float(low) if low is not None else float(np.min(xs)) if xs.size else None
    high = float(high) if high is not None else float(np.max(xs)) if xs.size else None
    if low is None or high is None or high <= low:
        return None
    # about sqrt(n) bins, so a bin holds a few trials on average; an int range gives no more bins than values
    n = int(min(8, max(2, round(np.sqrt(max(n_complete, 1))))))
    if spec.get("type") == "int":
        n = int(min(n, high - low + 1))
    if spec.get("log") and low > 0:
        return np.geomspace(low, high, n + 1)
    return np.linspace(low, high, n + 1)


def plot_isolation(sweep: Mapping, path: Path) -> Path:
    """The playbook's isolation plot per parameter: the best value reached among complete trials in each bin of
    that parameter (each choice of a categorical), other parameters free. Faint dots are the complete trials."""
    metric = (sweep.get("metric") or {}).get("name", "value")
    space = sweep.get("space") or {}
    keys = _sweep_params(sweep)
    sign = _sweep_sign(sweep)
    complete = [t for t in sweep.get("trials") or [] if t.get("state") == "COMPLETE" and _sweep_value(t) is not None]
    ys_all = np.array([_sweep_value(t) for t in complete], dtype=float)
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        spec = space.get(key) or {}
        xs, choices = _param_x(spec, [(t.get("params") or {}).get(key) for t in complete])
        keep = np.array([x is not None for x in xs], dtype=bool)
        x = np.array([np.nan if v is None else v for v in xs], dtype=float)[keep]
        y = ys_all[keep] if ys_all.size else ys_all
        if x.size == 0:
            _no_data(ax, "complete trial")
            ax.set_xlabel(key)
            continue
        ax.plot(x, y, "o", color="tab:blue", alpha=0.25, linestyle="none")
        if choices is not None:
            centres = np.arange(len(choices), dtype=float)
            bests = [(sign * (sign * y[x == i]).max()) if (x == i).any() else np.nan for i in range(len(choices))]
        else:
            edges = _bin_edges(spec, x, len(x))
            if edges is None:
                centres, bests = x[:1], [sign * (sign * y).max()]
            else:
                index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
                log = bool(spec.get("log")) and edges[0] > 0
                centres = np.sqrt(edges[:-1] * edges[1:]) if log else (edges[:-1] + edges[1:]) / 2
                bests = [(sign * (sign * y[index == i]).max()) if (index == i).any() else np.nan
                         for i in range(len(centres))]
                for edge in edges:
                    ax.axvline(edge, color="tab:gray", alpha=0.15, linewidth=0.8)
        ax.plot(centres, bests, "-o", color="tab:orange", label="best in bin")
        _param_axis(ax, key, spec, choices, list(x))
        ax.set_ylabel(f"best {metric}")
    if keys:
        axes[0].legend(loc="best", fontsize=7)
    else:
        _no_data(axes[0], "swept parameter")
    fig.suptitle(f"sweep isolation: best {metric} per value range of each parameter")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_top_trial_curves(sweep: Mapping, path: Path, k: int = 5) -> Path:
    """Validation primary metric over steps of the k best trials (complete first, by value), from history.csv."""
    metric = (sweep.get("metric") or {}).get("name", "value")
    sign = _sweep_sign(sweep)
    ranked = sorted(
        (t for t in sweep.get("trials") or [] if _sweep_value(t) is not None and t.get("run_dir")),
        key=lambda t: (t.get("state") != "COMPLETE", -sign * _sweep_value(t)),
    )[:k]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, trial in enumerate(ranked):
        history = read_history(Path(trial["run_dir"]))  # empty when the trial left no history
        if history.empty:
            continue
        column = metric if metric in history.columns else f"val/{metric.split('/', 1)[-1]}"
        series = column_series(history, column)
        if not series:
            continue
        best = _is_best(sweep, trial)
        label = f"slot {trial.get('slot')} ({trial.get('state', '?').lower()}, {_sweep_value(trial):.4g})"
        ax.plot(*series, color=f"C{i}", linewidth=2.4 if best else 1.2, label=label + (" best" if best else ""),
                linestyle="-" if trial.get("state") == "COMPLETE" else "--")
        if trial.get("best_step") is not None:
            hit = series[0] == float(trial["best_step"])
            if hit.any():
                ax.plot(series[0][hit], series[1][hit], "o", color=f"C{i}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if ax.lines:
        ax.legend(loc="best", fontsize=7)
    else:
        _no_data(ax, "trial history")
    ax.set_title(f"top {len(ranked)} trials: {metric}")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_importance(sweep: Mapping, path: Path) -> Path:
    """Parameter importance from sweep["importance"] as horizontal bars, largest on top."""
    importance = {k: float(v) for k, v in (sweep.get("importance") or {}).items() if v is not None}
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.45 * max(len(items), 2)))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        for i, (_, v) in enumerate(items):
            ax.annotate(f"{v:.3g}", xy=(v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel("importance")
        ax.set_title("parameter importance")
    else:
        n = sum(1 for t in sweep.get("trials") or [] if t.get("state") == "COMPLETE")
        ax.text(0.5, 0.5, f"not enough complete trials for parameter importance\n({n} complete)",
                ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_rounds(rounds: Sequence[Mapping], metric: str, path: Path, baseline: float | None = None,
                target: float | None = None, best_round: int | None = None, title: str = "") -> Path:
    """The primary metric per iterative round, with the baseline run as round 0.

    rounds: {"round", "value" (None when skipped or no value), "status", "run_status"}. Rounds without a value
    are named on the axis (skipped, diverged) rather than drawn, so the line joins only measured rounds.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs, ys = [], []
    if baseline is not None and np.isfinite(baseline):
        xs.append(0)
        ys.append(float(baseline))
    labels = {0: "baseline"}
    for r in rounds:
        k, value = int(r["round"]), r.get("value")
        labels[k] = f"round {k}"
        if r.get("status") != "trained":
            labels[k] += "\n(skipped)"
        elif r.get("run_status") == "diverged":
            labels[k] += "\n(diverged)"
        if value is not None and np.isfinite(float(value)) and r.get("status") == "trained":
            xs.append(k)
            ys.append(float(value))
    if xs:
        ax.plot(xs, ys, "-", color="tab:gray", alpha=0.6)
        colours = ["tab:blue" if x == 0 else "tab:orange" for x in xs]
        ax.scatter(xs, ys, c=colours, zorder=3)
        if best_round is not None and best_round in xs:
            y = ys[xs.index(best_round)]
            ax.scatter([best_round], [y], s=220, facecolors="none", edgecolors="tab:green", linewidths=2, zorder=4,
                       label="best")
    else:
        _no_data(ax, metric)
    if target is not None and np.isfinite(target):
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label="target")
    ticks = sorted(labels)
    ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=8)
    ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    ax.set_ylabel(metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --- per-group views (trainers that log `val/acc/<group>`) ----------------------------------------------

GROUP_ACC_PREFIX = "val/acc/"
GROUP_WEIGHT_PREFIX = "q/"


def group_columns(history: pd.DataFrame) -> list[str]:
    """`val/acc/<group>` columns (one level: `val/acc/<group>/<class>` is a group-by-class cell)."""
    return [c for c in history.columns if c.startswith(GROUP_ACC_PREFIX) and "/" not in c[len(GROUP_ACC_PREFIX):]]


def plot_group_curves(history: pd.DataFrame, path: Path, best_step: int | None = None, title: str = "") -> Path | None:
    """Validation accuracy of each group over steps with the worst-group and average accuracy, and, when
    logged, the GroupDRO weight of each group (`q/<group>`). None when the history has no group column."""
    groups = group_columns(history)
    if not groups:
        return None
    weights = [c for c in history.columns if c.startswith(GROUP_WEIGHT_PREFIX)]
    fig, axes = plt.subplots(1, 2 if weights else 1, figsize=(11 if weights else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, column in enumerate(groups):
        series = column_series(history, column)
        if series:
            ax.plot(*series, "-", color=f"C{i}", label=column[len(GROUP_ACC_PREFIX):])
    for column, style in (("val/worst_group_acc", "k--"), ("val/avg_acc", "k:")):
        series = column_series(history, column)
        if series:
            ax.plot(*series, style, label=column.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best", fontsize=8)
    if best_step is not None:
        ax.axvline(best_step, color="tab:green", alpha=0.6, linewidth=1)
    if weights:
        ax_q = axes[0][1]
        for i, column in enumerate(weights):
            series = column_series(history, column)
            if series:
                ax_q.plot(*series, "-", color=f"C{i}", label=column[len(GROUP_WEIGHT_PREFIX):])
        ax_q.set_xlabel("step")
        ax_q.set_ylabel("GroupDRO weight q")
        ax_q.set_ylim(0, 1.02)
        ax_q.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(confusion: Mapping, path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class by row) with the counts written in the cells.

    `confusion` follows the trainers' contract: {"classes": [...], "matrix": [[count, ...], ...]} with
    matrix[true][predicted]; "split" and "step" go into the title when present.
    """
    classes = list(confusion["classes"])
    counts = np.asarray(confusion["matrix"], dtype=float)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix: expected {len(classes)}x{len(classes)}, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = max(4.0, 0.55 * len(classes) + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if len(classes) <= 20:  # beyond that the numbers are unreadable; the colours still show the pattern
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    where = ", ".join(f"{k} {confusion[k]}" for k in ("split", "step") if confusion.get(k) is not None)
    heading = " ".join(p for p in (title, f"({where})" if where else "") if p)
    if heading:
        ax.set_title(heading)
    fig.tight_layout()
    return save_figure(fig, path)


# --- inverse design (design_report.md) ------------------------------------------------------------

DESIGN_COLOURS = {True: "tab:green", False: "tab:red"}  # passed the round trip / off-manifold or infeasible


def plot_design_trajectories(trajectory: np.ndarray, ok: Sequence[bool], path: Path, title: str = "") -> Path:
    """Score of every restart over the design steps ([steps, restarts], NaN once a restart stopped)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, trajectory.shape[0] + 1)
    for flag in (False, True):  # passing restarts drawn on top
        cols = [r for r in range(trajectory.shape[1]) if bool(ok[r]) == flag]
        for i, r in enumerate(cols):
            ax.plot(steps, trajectory[:, r], color=DESIGN_COLOURS[flag], alpha=0.35, lw=0.8,
                    label=("passed the round trip" if flag else "off-manifold or infeasible") if i == 0 else None)
    ax.set_xlabel("design step")
    ax.set_ylabel("objective score at z (model units)")
    ax.set_title(title or "design trajectories, one line per restart")
    if trajectory.shape[1]:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_design_scores(score: Sequence[float], score_rt: Sequence[float], ok: Sequence[bool], path: Path,
                       title: str = "") -> Path:
    """Distribution of the final scores: as promised at z* and as validated at E(D(z*))."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    score, score_rt = np.asarray(score, dtype=float), np.asarray(score_rt, dtype=float)
    finite = np.concatenate([score[np.isfinite(score)], score_rt[np.isfinite(score_rt)]])
    bins = np.histogram_bin_edges(finite, bins=min(30, max(5, len(score)))) if len(finite) else 10
    ax.hist(score[np.isfinite(score)], bins=bins, alpha=0.5, color="tab:gray", label="at z* (promised)")
    ax.hist(score_rt[np.isfinite(score_rt)], bins=bins, alpha=0.6, color="tab:blue", label="at E(D(z*)) (round trip)")
    ax.set_xlabel("objective score (model units)")
    ax.set_ylabel("restarts")
    n_ok = int(np.sum(np.asarray(ok, dtype=bool)))
    ax.set_title(title or f"final scores of {len(score)} restarts ({n_ok} passed the round trip)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_design_vs_known(points: Sequence[Mapping], task: str, unit: str, log: bool, path: Path,
                         best_known: float | None = None, title: str = "") -> Path:
    """Per design: predicted property (x) against the measured value of its nearest known compound (y).
    `points`: {"predicted", "predicted_roundtrip", "nearest", "ok"}."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    values = []
    for flag in (False, True):
        pts = [p for p in points if bool(p["ok"]) == flag and p.get("predicted") is not None and p.get("nearest") is not None]
        if not pts:
            continue
        x = np.array([p["predicted_roundtrip"] if p.get("predicted_roundtrip") is not None else np.nan for p in pts], float)
        y = np.array([p["nearest"] for p in pts], float)
        ax.scatter(x, y, s=18, color=DESIGN_COLOURS[flag], alpha=0.7,
                   label="passed the round trip" if flag else "off-manifold or infeasible")
        values += [v for v in np.concatenate([x, y]) if np.isfinite(v) and (v > 0 or not log)]
    if values:
        lo, hi = min(values), max(values)
        if best_known is not None and np.isfinite(best_known):
            hi = max(hi, best_known)
            ax.axhline(best_known, color="tab:purple", ls=":", lw=1, label=f"best known {task} in the data")
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
        if log and lo > 0:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "designs")
    suffix = f" ({unit})" if unit else ""
    ax.set_xlabel(f"predicted {task} of the design (round trip){suffix}")
    ax.set_ylabel(f"measured {task} of the nearest known compound{suffix}")
    ax.set_title(title or f"{task}: designs against their nearest known compounds")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_alpha_study(rows: Sequence[Mapping], path: Path, chosen: float | None = None) -> Path:
    """Off-manifold rate and best validated score against the alignment weight alpha."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rows = sorted(rows, key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in rows]
    ax.plot(alphas, [r["off_manifold_rate"] for r in rows], "o-", color="tab:red", label="off-manifold rate")
    ax.set_xlabel("alignment weight alpha")
    ax.set_ylabel("off-manifold rate", color="tab:red")
    ax.set_ylim(-0.05, 1.05)
    ax2 = ax.twinx()
    ax2.plot(alphas, [r["validated_score"] for r in rows], "s--", color="tab:blue", label="best validated score")
    ax2.set_ylabel("best validated score (model units)", color="tab:blue")
    if chosen is not None:
        ax.axvline(chosen, color="k", lw=0.8, ls=":")
    ax.set_title("alpha study: same restarts, steps and seeds at each alpha")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_loop_rounds(rounds: Sequence[Mapping], metric: str, path: Path, title: str = "") -> Path:
    """The primary metric per optimization round: the config each round started from and the one it tried,
    seed mean with one standard deviation; a verified improvement filled, the rest hollow.

    rounds: {"round", "baseline": {mean, std} | None, "optimized": {mean, std} | None, "verdict"}."""
    fig, ax = plt.subplots(figsize=(2.0 + 1.2 * max(len(rounds), 1), 4))
    for row in rounds:
        k = row["round"]
        for offset, side, colour in ((-0.12, "baseline", _colour("baseline", 0)), (0.12, "optimized", _colour("optimized", 1))):
            s = row.get(side)
            if not s or s.get("mean") is None:
                continue
            std = s.get("std")
            filled = side == "baseline" or row.get("verdict") == "improved"
            ax.errorbar(k + offset, s["mean"], yerr=std if std is not None else None, fmt="o", capsize=4,
                        color=colour, markerfacecolor=colour if filled else "white",
                        label=("started from" if side == "baseline" else "tried (filled: verified improvement)")
                        if k == rounds[0]["round"] else None)
    ax.set_xticks([r["round"] for r in rounds], [f"round {r['round']}" for r in rounds])
    ax.set_xlim(min((r["round"] for r in rounds), default=1) - 0.6, max((r["round"] for r in rounds), default=1) + 0.6)
    ax.set_ylabel(metric)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    else:
        _no_data(ax, "rounds")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
