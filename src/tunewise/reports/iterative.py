"""The iterative section of optimization_results.md: one row per round (changes, metric, gain, decision) and
a plot of the metric per round with the baseline as round 0.

Everything comes from `iterative.json` (written by `tunewise iterate --summary`).
"""
from __future__ import annotations

from pathlib import Path

from tunewise.reports.plots import plot_rounds
from tunewise.reports.markdown import link
from tunewise.runs import read_json

PLOT_NAME = "iterative_rounds.png"


def _row(record: dict) -> dict:
    decision = record.get("decision") or {}
    return {
        "round": record["round"],
        "status": record.get("status"),
        "run_status": record.get("run_status"),
        "changes": [{k: c.get(k) for k in ("key", "old", "new")} for c in record.get("changes") or []],
        "findings": sorted({f.get("root_cause") or f.get("id") for f in record.get("findings") or []} - {None}),
        "value": record.get("value"),
        "gain": record.get("gain"),
        "gain_rel": record.get("gain_rel"),
        "option": decision.get("option"),
        "label": decision.get("label"),
        "proceed": decision.get("continue"),
        "reason": decision.get("reason"),
    }


def iterative_context(iterative_json_path: Path, report_path: Path, plots_dir: Path | None = None) -> dict:
    """Template context for `_iterative.md.j2`; draws the per-round plot (listed under `written`)."""
    iterative_json_path, report_path = Path(iterative_json_path), Path(report_path)
    data = read_json(iterative_json_path)
    metric = data["metric"]
    baseline = data.get("baseline") or {}
    best = data.get("best") or {}
    rounds = [_row(r) for r in data.get("rounds") or []]
    stopper = next((r for r in rounds if r["proceed"] is False), None)
    plot = plot_rounds(
        [{"round": r["round"], "value": r["value"], "status": r["status"], "run_status": r["run_status"]} for r in rounds],
        metric["name"], (plots_dir or report_path.parent / "plots") / PLOT_NAME,
        baseline=baseline.get("value"), target=data.get("target"), best_round=best.get("round"),
        title=f"{data.get('experiment') or ''}: {metric['name']} per iterative round".lstrip(": "),
    )
    return {
        "metric": metric,
        "target": data.get("target"),
        "max_iterations": data.get("max_iterations"),
        "ceiling_gain": data.get("ceiling_gain"),
        "baseline": {"value": baseline.get("value"), "run_dir": baseline.get("run_dir")},
        "rounds": rounds,
        "trained": sum(r["status"] == "trained" for r in rounds),
        "stopped_at": stopper["round"] if stopper else None,
        "best": {k: best.get(k) for k in ("round", "value", "run_dir", "config", "source_config", "reverted_to_baseline")},
        "link": link(iterative_json_path, report_path),
        "plot": link(plot, report_path),
        "written": [plot],
    }
