"""The sweep section of optimization_results.md: trial table, playbook checks and the four sweep plots.

Everything comes from `sweep.json` (written by select_best) and the trial run directories it names.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tunewise.reports.plots import plot_importance, plot_isolation, plot_param_axes, plot_top_trial_curves
from tunewise.reports.markdown import link
from tunewise.runs import finite_float, read_json

STATES = ("COMPLETE", "PRUNED", "FAIL")
RESULT_WORDS = {True: "pass", False: "fires", None: "cannot tell"}
PLOT_NAMES = {"param_axes": "sweep_param_axes.png", "isolation": "sweep_isolation.png",
              "top_curves": "sweep_top_curves.png", "importance": "sweep_importance.png"}


def _resolve_run_dir(run_dir: str | None, sweep_json: Path) -> str | None:
    """A trial's run_dir as written (relative to the workflow's working directory) or, failing that, relative to
    sweep.json's folder, so a report rendered from elsewhere still finds the histories."""
    if not run_dir or os.path.isabs(run_dir) or Path(run_dir).exists():
        return run_dir
    beside = sweep_json.parent / run_dir
    return str(beside) if beside.exists() else run_dir


def _is_best(trial: dict, best: dict) -> bool:
    for key in ("slot", "number"):
        if best.get(key) is not None and trial.get(key) is not None:
            return trial[key] == best[key]
    return False


def _space_rows(space: dict) -> list[dict]:
    rows = []
    for key, spec in space.items():
        spec = spec or {}
        if spec.get("type") == "categorical":
            values = spec.get("choices")
        else:
            values = [spec.get("low"), spec.get("high")]
        # not "values": a template reading row.values would get the dict method
        rows.append({"key": key, "type": spec.get("type", "float"), "range": values, "log": bool(spec.get("log")),
                     "step": spec.get("step")})
    return rows


def _trial_rows(trials: list[dict], keys: list[str], best: dict, direction: str) -> list[dict]:
    """Best first: complete trials by value in the metric's direction, then pruned (partial values), then the
    rest; within a state, trials without a value last, then by slot."""
    sign = 1 if direction == "max" else -1
    order = {state: i for i, state in enumerate(STATES)}

    def key(trial: dict):
        value = finite_float(trial.get("value"))
        return (order.get(trial.get("state"), len(order)), value is None, -sign * (value or 0.0),
                trial.get("slot") if trial.get("slot") is not None else math.inf)

    rows = []
    for rank, trial in enumerate(sorted(trials, key=key), 1):
        params = trial.get("params") or {}
        rows.append({
            "rank": rank, "slot": trial.get("slot"), "number": trial.get("number"), "state": trial.get("state"),
            "value": trial.get("value"), "best_step": trial.get("best_step"), "epochs_run": trial.get("epochs_run"),
            "epochs_planned": trial.get("epochs_planned"), "params": [params.get(k) for k in keys],
            "reason": trial.get("reason"), "run_dir": trial.get("run_dir"), "best": _is_best(trial, best),
        })
    return rows


def sweep_context(sweep_json_path: Path, report_path: Path, plots_dir: Path) -> dict[str, Any]:
    """Template context of the sweep section; draws the four sweep plots into `plots_dir`.

    Plot links are relative to `report_path`; `written` lists the plot files.
    """
    sweep_json_path, report_path, plots_dir = Path(sweep_json_path), Path(report_path), Path(plots_dir)
    sweep = read_json(sweep_json_path)
    metric = sweep.get("metric") or {}
    space = sweep.get("space") or {}
    trials = [dict(t, run_dir=_resolve_run_dir(t.get("run_dir"), sweep_json_path)) for t in sweep.get("trials") or []]
    sweep = {**sweep, "trials": trials}
    best = sweep.get("best") or {}
    keys = list(space)
    keys += [k for t in trials for k in t.get("params") or {} if k not in keys]

    counts = {state: sum(1 for t in trials if t.get("state") == state) for state in STATES}
    counts["other"] = len(trials) - sum(counts.values())
    counts["recorded"] = len(trials)
    n_trials = sweep.get("n_trials")
    counts["not_recorded"] = max(int(n_trials) - len(trials), 0) if isinstance(n_trials, int) else None

    # the playbook's checks as select-best judged them (sweep.json), not judged again here; an informational
    # check (pruned share) is noted, not passed
    if "checks" not in sweep:
        raise ValueError(f"{sweep_json_path}: no `checks` (written by `tunewise select-best`)")
    checks = [{**c, "result": "noted" if c["severity"] == "info" and c["ok"] else RESULT_WORDS[c["ok"]]}
              for c in sweep["checks"]]
    drawers = {"param_axes": plot_param_axes, "isolation": plot_isolation, "top_curves": plot_top_trial_curves,
               "importance": plot_importance}
    written = {name: draw(sweep, plots_dir / PLOT_NAMES[name]) for name, draw in drawers.items()}
    importance = sorted((sweep.get("importance") or {}).items(), key=lambda kv: -(kv[1] or 0.0))
    return {
        "path": str(sweep_json_path), "link": link(sweep_json_path, report_path),
        "metric": {"name": metric.get("name"), "direction": metric.get("direction", "max")},
        "sampler": sweep.get("sampler"), "pruner": sweep.get("pruner"), "n_trials": n_trials,
        "params": keys, "space": _space_rows(space), "counts": counts,
        "trials": _trial_rows(trials, keys, best, metric.get("direction", "max")),
        "best": {k: best.get(k) for k in ("slot", "number", "value", "run_dir")},
        "best_params": [(k, (best.get("params") or {}).get(k)) for k in keys],
        "checks": checks,
        "n_fired": sum(1 for c in checks if c["ok"] is False),
        "n_unknown": sum(1 for c in checks if c["ok"] is None),
        "importance": importance,
        "plots": {name: link(path, report_path) for name, path in written.items()},
        "written": list(written.values()),
    }
