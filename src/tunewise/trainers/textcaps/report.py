"""The textcaps trainer's report section (registered in its spec's `report_sections`): per-group accuracy
(`val/acc/<group>`, `val/worst_group_acc`, `val/avg_acc`, optionally GroupDRO's `q/<group>`) and a confusion
matrix, in the diagnostic report, optimization_results.md and the final report.

Everything comes from a run directory (`history.csv`, the optional `runs.CONFUSION_FILE`) or from the
`confusion_test.json` evaluate_test wrote for the final report; a run without group columns gets no section.
This module belongs to the report layer: the trainer names it, the report writers import it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tunewise.reports.plots import GROUP_ACC_PREFIX, group_columns, plot_confusion, plot_group_curves
from tunewise.reports.markdown import link, render
from tunewise.reports.sections import Section, SectionContext
from tunewise.runs import CONFUSION_FILE, finite_float, read_history, read_json
from tunewise.trainers.textcaps.spec import TEST_CONFUSION_FILE

SUMMARY_COLUMNS = ("val/worst_group_acc", "val/avg_acc", "val/acc")


def _row_at(history: pd.DataFrame, step: int | None) -> pd.Series | None:
    if history.empty:
        return None
    if step is not None and "step" in history:
        rows = history[pd.to_numeric(history["step"], errors="coerce") == step]
        if len(rows):
            return rows.iloc[-1]
    return history.iloc[-1]


def _value(row: pd.Series | None, column: str) -> float | None:
    return None if row is None or column not in row.index else finite_float(row[column])


def val_confusion(run_dir: Path, step: int | None) -> dict | None:
    """The validation confusion matrix a trainer recorded for `step` (else its last step), or None."""
    path = Path(run_dir) / CONFUSION_FILE
    if not path.exists():
        return None
    data = read_json(path)
    steps = data.get("steps") or {}
    if not steps:
        return None
    key = str(step) if step is not None and str(step) in steps else max(steps, key=int)
    return {"split": data.get("split", "val"), "step": int(key), "classes": data["classes"], "matrix": steps[key]}


def group_table(run_dirs: dict[str, Path | None], best_steps: dict[str, int | None], report_path: Path,
                  plots_dir: Path, name: str, title: str, confusion: dict | None = None,
                  run_label: str | None = None, plot_run: str | None = None) -> dict | None:
    """The context of `_groups.md.j2`: per-group validation accuracy at each run's best step (one column
    per run in `run_dirs`, e.g. baseline and optimized), the group curves and the confusion matrix of the
    first run or of `plot_run` (or `confusion` when given, e.g. the test split's), described as `run_label`
    in the captions.
    None when no run logged group accuracy."""
    report_path, plots_dir = Path(report_path), Path(plots_dir)
    histories = {label: read_history(d) for label, d in run_dirs.items() if d is not None}
    rows_at = {label: _row_at(h, best_steps.get(label)) for label, h in histories.items()}
    groups: list[str] = []
    for h in histories.values():
        groups += [c for c in group_columns(h) if c not in groups]
    if not groups:
        return None
    labels = list(histories)
    table = [{"name": c[len(GROUP_ACC_PREFIX):], "cells": [_value(rows_at[lb], c) for lb in labels]} for c in groups]
    summary = [{"name": c.split("/", 1)[1], "column": c, "cells": [_value(rows_at[lb], c) for lb in labels]}
               for c in SUMMARY_COLUMNS if any(c in h for h in histories.values())]
    first = plot_run if plot_run in histories else labels[0]  # the run the curves and confusion matrix show
    written = []
    curves = plot_group_curves(histories[first], plots_dir / f"{name}_groups.png", best_steps.get(first),
                               title=f"{title}: per-group validation accuracy")
    if curves is not None:
        written.append(curves)
    if confusion is None and run_dirs[first] is not None:
        confusion = val_confusion(Path(run_dirs[first]), best_steps.get(first))
    confusion_plot = None
    if confusion is not None:
        confusion_plot = plot_confusion(confusion, plots_dir / f"{name}_confusion.png", title=title)
        written.append(confusion_plot)
    return {
        "labels": labels,
        "steps": [int(rows_at[lb]["step"]) if rows_at[lb] is not None and "step" in rows_at[lb].index else None
                  for lb in labels],
        "rows": table,
        "summary": summary,
        "curves": link(curves, report_path) if curves is not None else None,
        "run_label": run_label or f"{first} run",
        "confusion": link(confusion_plot, report_path) if confusion_plot is not None else None,
        "confusion_where": {k: confusion.get(k) for k in ("split", "step")} if confusion else None,
        "written": written,
    }


def group_section(ctx: SectionContext) -> Section | None:
    """The per-group section of any report; the final report adds the test split's column and shows the test
    confusion matrix."""
    confusion = None
    if ctx.tables_dir is not None and (ctx.tables_dir / TEST_CONFUSION_FILE).is_file():
        confusion = read_json(ctx.tables_dir / TEST_CONFUSION_FILE)
    groups = group_table(ctx.runs, ctx.best_steps, ctx.report_path, ctx.plots_dir, ctx.name, ctx.title,
                         confusion=confusion, run_label=ctx.run_label, plot_run=ctx.shown)
    if groups is None:
        return None
    if ctx.report == "final":  # the test split's per-group accuracy next to the validation one
        groups["labels"].append("test")
        groups["steps"].append(None)
        for r in groups["rows"]:
            r["cells"].append(ctx.test_metrics.get(f"test/acc/{r['name']}"))
        for r in groups["summary"]:
            r["cells"].append(ctx.test_metrics.get(r["column"].replace("val/", "test/", 1)))
    return Section(render("_groups.md.j2", beside=Path(__file__).parent, groups=groups), groups["written"])
