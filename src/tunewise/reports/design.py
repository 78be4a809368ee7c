"""design_report.md: the inverse design of an experiment's final model (trainers with a design phase).

Every number comes from design.json and the trajectories.csv beside it (both written by `tunewise design`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tunewise.reports.plots import (
    plot_alpha_study, plot_design_scores, plot_design_trajectories, plot_design_vs_known,
)
from tunewise.reports.markdown import link, render
from tunewise.runs import atomic_write_text


def _objective_line(o: dict, units: dict) -> str:
    unit = units.get(o["task"]) or ""
    mode = o.get("mode", "max")
    what = {"max": "maximise", "min": "minimise"}.get(mode) or f"reach {o.get('target')} {unit}".rstrip()
    weight = o.get("weight", 1.0)
    return f"{what} `{o['task']}`" + (f" (weight {weight})" if weight != 1.0 else "")


def _constraint_line(c: dict, units: dict) -> str:
    unit = units.get(c["task"]) or ""
    parts = []
    if c.get("min") is not None:
        parts.append(f">= {c['min']}")
    if c.get("max") is not None:
        parts.append(f"<= {c['max']}")
    return f"`{c['task']}` " + " and ".join(parts) + (f" {unit}" if unit else "")


def write_design_report(design: dict, reports_dir: Path) -> list[Path]:
    reports_dir = Path(reports_dir)
    report = reports_dir / "design_report.md"
    plots = reports_dir / "plots"
    settings, summary, restarts = design["settings"], design["summary"], design["restarts"]
    units, log_targets = design.get("units") or {}, set(design.get("log_targets") or [])
    objective_tasks = [o["task"] for o in settings["objectives"]]
    constraint_tasks = [c["task"] for c in settings.get("constraints") or []]
    shown_tasks = list(dict.fromkeys(objective_tasks + constraint_tasks))
    by_restart = {r["restart"]: r for r in restarts}
    ok = [bool(by_restart[r]["ok"]) for r in sorted(by_restart)]
    written = []

    traj_path = Path((design.get("files") or {}).get("trajectories", ""))
    trajectory_link = None
    if traj_path.is_file():
        traj = pd.read_csv(traj_path)
        columns = [f"r{r}" for r in sorted(by_restart)]
        p = plot_design_trajectories(traj[columns].to_numpy(dtype=float), ok, plots / "design_trajectories.png")
        written.append(p)
        trajectory_link = link(p, report)
    p = plot_design_scores([by_restart[r]["score"] for r in sorted(by_restart)],
                           [by_restart[r]["score_roundtrip"] for r in sorted(by_restart)], ok, plots / "design_scores.png")
    written.append(p)
    scores_link = link(p, report)
    known = {b["task"]: b for b in design.get("best_known") or []}
    vs_known = []
    for task in objective_tasks:
        points = [{"predicted": r["predicted"].get(task), "predicted_roundtrip": r["predicted_roundtrip"].get(task),
                   "nearest": (r["neighbours"][0]["properties"].get(task) if r["neighbours"] else None), "ok": r["ok"]}
                  for r in restarts]
        p = plot_design_vs_known(points, task, units.get(task, ""), task in log_targets, plots / f"design_vs_known_{task}.png",
                                 best_known=(known.get(task) or {}).get("measured"))
        written.append(p)
        vs_known.append({"task": task, "link": link(p, report)})
    alpha_link = None
    if design.get("alpha_study"):
        p = plot_alpha_study(design["alpha_study"], plots / "design_alpha_study.png", chosen=design.get("alpha"))
        written.append(p)
        alpha_link = link(p, report)

    top = int(settings.get("top", 5))
    passed = [r for r in restarts if r["ok"]][:top]
    failed = [r for r in restarts if not r["ok"]][: top if not passed else 0]
    steps = [r["steps"] for r in restarts]
    text = render(
        "design_report.md.j2",
        experiment=design.get("experiment"), checkpoint=design.get("checkpoint"), final=design.get("final"),
        settings=settings, summary=summary, alpha=design.get("alpha"), units=units, tasks=shown_tasks,
        objectives=[_objective_line(o, units) for o in settings["objectives"]],
        constraints=[_constraint_line(c, units) for c in settings.get("constraints") or []],
        passed=passed, failed=failed, best_known=design.get("best_known") or [],
        alpha_study=sorted(design.get("alpha_study") or [], key=lambda r: r["alpha"]),
        steps={"min": min(steps) if steps else None, "max": max(steps) if steps else None,
               "mean": float(np.mean(steps)) if steps else None},
        plots={"trajectories": trajectory_link, "scores": scores_link, "vs_known": vs_known, "alpha": alpha_link},
    )
    atomic_write_text(report, text)
    return [report, *written]
