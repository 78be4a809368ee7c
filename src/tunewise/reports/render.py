"""Markdown reports rendered from the files the workflow wrote.

Templates (reports/templates/*.md.j2) hold the words; every number comes from a JSON, CSV or
YAML file passed in here, formatted by the `fmt` / `pct` filters. Outputs are replaced
atomically, and each writer returns the paths it wrote.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tunewise.config import commented_config
# the helpers every report writer shares; fmt, pct, cell and render stay importable from here
from tunewise.reports.markdown import (  # noqa: F401
    TEMPLATES_ENV,
    cell,
    environment,
    fmt,
    link,
    number,
    pct,
    render,
    templates_dir,
)
from tunewise.reports.sections import SectionContext, trainer_sections
from tunewise.reports.sections import written as section_files
from tunewise.runs import atomic_write_text, read_history, read_json, read_json_if_exists

REPORT_NAMES = ("diagnostic_report.md", "optimization_results.md", "significance.md", "final_report.md", "design_report.md")


# --- reading the workflow's files -----------------------------------------------------------


def _run_summary(metrics: dict | None, fallback: dict | None = None) -> dict:
    """The baseline/optimized numbers a report prints, from metrics.json (diagnosis.json's copy as fallback)."""
    metrics = metrics or {}
    fallback = fallback or {}
    primary = metrics.get("primary") or {}

    def pick(key: str, source: dict) -> Any:
        return source[key] if key in source else fallback.get(key)

    return {
        "status": pick("status", metrics),
        "best": pick("best", primary),
        "final": pick("final", primary),
        "best_step": pick("best_step", metrics),
        "epochs_run": pick("epochs_run", metrics),
        "epochs_planned": metrics.get("epochs_planned"),
        "stopped_early": metrics.get("stopped_early"),
        "wall_seconds": metrics.get("wall_seconds"),
        "samples_per_s": metrics.get("samples_per_s"),
        "device": metrics.get("device"),
        "reason": metrics.get("reason"),
    }


def _train_val_gap(metrics: dict, metric: str, direction: str) -> float | None:
    """How much better the training split looks than validation at the best step (positive = overfit)."""
    best = metrics.get("best") or {}
    name = metric.split("/", 1)[-1]
    train, val = number(best.get(f"train/{name}")), number(best.get(f"val/{name}"))
    if train is None or val is None:
        return None
    return train - val if direction == "max" else val - train


def _per_epoch(metrics: dict) -> float | None:
    wall, epochs = number(metrics.get("wall_seconds")), number(metrics.get("epochs_run"))
    return wall / epochs if wall is not None and epochs else None


def _measures(metrics: dict | None, metric: str, direction: str) -> list[tuple[str, Any]]:
    if not metrics:
        return []
    primary = metrics.get("primary") or {}
    return [
        (f"{metric} best", primary.get("best")),
        (f"{metric} final", primary.get("final")),
        (f"train-val gap of {metric.split('/', 1)[-1]} at best step", _train_val_gap(metrics, metric, direction)),
        ("epochs to best", metrics.get("best_step")),
        ("epochs run", metrics.get("epochs_run")),
        ("epochs planned", metrics.get("epochs_planned")),
        ("stopped early", metrics.get("stopped_early")),
        ("time per epoch (s)", _per_epoch(metrics)),
        ("samples/s", metrics.get("samples_per_s")),
        ("wall time (s)", metrics.get("wall_seconds")),
    ]


def _comparison(base: dict | None, opt: dict | None, metric: str, direction: str) -> list[dict]:
    rows = []
    opt_values = dict(_measures(opt, metric, direction))
    for label, value in _measures(base, metric, direction):
        other = opt_values.get(label)
        a, b = number(value), number(other)
        change = b - a if a is not None and b is not None and not isinstance(value, bool) else None
        rows.append({"label": label, "baseline": value, "optimized": other, "change": change})
    return rows


def _changes(diag: dict) -> list[dict]:
    keys = ("knob", "key", "old", "new", "action", "rationale", "expected_impact", "risk", "effort")
    return [{k: c.get(k) for k in keys} for c in diag.get("changes") or []]


# --- diagnostic report ----------------------------------------------------------------------


def _config_preview(baseline_run_dir: Path, diagnosis_path: Path, diag: dict) -> tuple[str, str | None]:
    """(unified diff baseline -> optimization config, the optimization config text)."""
    base_path = Path(baseline_run_dir) / "config.yaml"
    base_text = base_path.read_text(encoding="utf-8") if base_path.exists() else ""
    opt_path = Path(diagnosis_path).parent / "optimization_config.yaml"
    if opt_path.exists():
        opt_text = opt_path.read_text(encoding="utf-8")
    elif diag.get("patch") and base_text:
        # no preview file: show the diagnosis' own patch applied to the baseline config
        from tunewise.config import set_dotted

        config = copy.deepcopy(yaml.safe_load(base_text) or {})
        for key, value in diag["patch"].items():
            set_dotted(config, key, value)
        opt_text = commented_config(config, diag.get("changes") or [])
    else:
        return "", None
    diff = difflib.unified_diff(
        base_text.splitlines(keepends=True), opt_text.splitlines(keepends=True),
        fromfile="baseline/config.yaml", tofile="optimization_config.yaml",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in diff), opt_text


def _data_checks(checks: dict | None) -> dict | None:
    """The Data section: what the data checks at preparation counted, dropped and doubted (ready.json's
    data_checks, carried into diagnosis.json); None for a trainer that reports none."""
    if not checks:
        return None
    dropped = [{"count": d.get("count"), "reason": d.get("reason") or "", "where": d.get("where") or "",
                "examples": ", ".join(str(e) for e in (d.get("examples") or [])[:5])} for d in checks.get("dropped") or []]
    return {"rows": list((checks.get("rows") or {}).items()), "dropped": dropped,
            "warnings": list(checks.get("warnings") or []), "notes": list(checks.get("notes") or [])}


def write_diagnostic_report(diagnosis_path: Path, baseline_run_dir: Path, reports_dir: Path) -> list[Path]:
    from tunewise.reports.plots import plot_curves

    diagnosis_path, baseline_run_dir, reports_dir = Path(diagnosis_path), Path(baseline_run_dir), Path(reports_dir)
    diag = read_json(diagnosis_path)
    metrics = read_json_if_exists(baseline_run_dir / "metrics.json")
    metric = diag["metric"]
    summary = _run_summary(metrics, diag.get("baseline"))
    report = reports_dir / "diagnostic_report.md"
    written: list[Path] = []

    plot = plot_curves(read_history(baseline_run_dir), metric["name"], summary["best_step"],
                       reports_dir / "plots" / "baseline_curves.png", title=f"{diag['experiment']}: baseline")
    written.append(plot)
    diff, opt_text = _config_preview(baseline_run_dir, diagnosis_path, diag)
    config_link = None
    if opt_text is not None:
        copied = reports_dir / "optimization_config.yaml"
        atomic_write_text(copied, opt_text)
        written.append(copied)
        config_link = link(copied, report)

    findings = [
        {
            "id": f.get("id"), "root_cause": f.get("root_cause"), "severity": f.get("severity"),
            "summary": f.get("summary") or "",
            "evidence": list((f.get("evidence") or {}).items()),
        }
        for f in diag.get("findings") or []
    ]
    keys = ("knob", "action", "value", "expected_impact", "risk", "effort", "rationale", "root_cause", "finding_id")
    recommendations = [{"rank": i, **{k: r.get(k) for k in keys}} for i, r in enumerate(diag.get("recommendations") or [], 1)]
    sections = trainer_sections(diag.get("trainer"), SectionContext(
        "diagnostic", report, reports_dir / "plots", "baseline", f"{diag['experiment']}: baseline",
        {"baseline": baseline_run_dir}, {"baseline": summary["best_step"]}, "baseline", "baseline run"))
    written += section_files(sections)
    strategy = diag.get("strategy") or {}
    text = render(
        "diagnostic_report.md.j2", sections=sections,
        experiment=diag["experiment"], trainer=diag.get("trainer"), metric=metric,
        run_dir=str(baseline_run_dir), summary=summary, findings=findings, recommendations=recommendations,
        changes=_changes(diag), patch=list((diag.get("patch") or {}).items()),
        strategy={k: strategy.get(k) for k in ("requested", "chosen", "reason")},
        diff=diff, config_link=config_link, plot=link(plot, report), data=_data_checks(diag.get("data_checks")),
    )
    atomic_write_text(report, text)
    return [report, *written]


# --- optimization results and significance --------------------------------------------------


def _seed_labels(sig: dict, side: dict) -> list[str]:
    values = side.get("values") or []
    seeds = sig.get("seeds")
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if isinstance(seeds, list) and len(seeds) == len(values):
        return [str(s) for s in seeds]
    runs = side.get("runs") or []
    if len(runs) == len(values):
        return [Path(r).name for r in runs]
    return [str(i) for i in range(1, len(values) + 1)]


def _side(sig: dict, name: str) -> dict | None:
    side = sig.get(name)
    if not isinstance(side, dict):
        return None
    return {
        "name": name, "n": side.get("n"), "mean": side.get("mean"), "std": side.get("std"),
        "values": list(side.get("values") or []), "labels": _seed_labels(sig, side),
        "runs": list(side.get("runs") or []),
    }


def _seed_rule(sig: dict, base: dict | None, opt: dict | None, direction: str) -> dict:
    """Seed 004's rule as the file states it, with the two numbers it compares."""
    rule = sig.get("seed004_rule")
    bound = None
    mean, std = (number(opt["mean"]), number(opt["std"])) if opt else (None, None)
    if mean is not None and std is not None:
        bound = mean - 2 * std if direction == "max" else mean + 2 * std
    holds = rule if isinstance(rule, bool) else (rule.get("holds", rule.get("passed")) if isinstance(rule, dict) else None)
    details = [(k, v) for k, v in rule.items() if k not in ("holds", "passed")] if isinstance(rule, dict) else []
    return {
        "holds": holds, "details": details, "bound": bound, "baseline_mean": base["mean"] if base else None,
        "inequality": "mean_opt - 2 std_opt > mean_baseline" if direction == "max" else "mean_opt + 2 std_opt < mean_baseline",
        "raw": None if isinstance(rule, (bool, dict)) else rule,
    }


def _significance_context(sig: dict, direction: str) -> dict:
    base, opt = _side(sig, "baseline"), _side(sig, "optimized")
    seed_rows = []
    if base:
        for i, label in enumerate(base["labels"]):
            seed_rows.append({
                "seed": label, "baseline": base["values"][i],
                "optimized": opt["values"][i] if opt and i < len(opt["values"]) else None,
            })
    numbers = ("diff", "improvement", "improvement_rel", "improvement_measured", "alpha", "min_improvement",
               "p_two_sided", "p_one_sided", "verdict", "reason")
    # phases/significance.py nests the interval under `ci` and names the effect size `hedges_g`;
    # the flat names of the shared contract are read first
    ci = sig.get("ci") if isinstance(sig.get("ci"), dict) else {}
    mode = sig.get("mode", sig.get("improvement_measured_as"))
    return {
        "skipped": bool(sig.get("skipped")), "baseline": base, "optimized": opt, "seed_rows": seed_rows,
        "mode": mode, "relative": mode == "relative", "rule": _seed_rule(sig, base, opt, direction),
        "ci_low": sig.get("ci_low", ci.get("low")), "ci_high": sig.get("ci_high", ci.get("high")),
        "ci_level": sig.get("ci_level", ci.get("level")), "ci_of": ci.get("of") or "the difference",
        "ci_method": ci.get("method") or "bootstrap",
        "effect_size_g": sig.get("effect_size_g", sig.get("hedges_g")),
        **{k: sig.get(k) for k in numbers},
    }


def write_optimization_results(significance_path: Path, decision_path: Path, diagnosis_path: Path,
                               baseline_run_dir: Path, optimized_run_dir: Path | None,
                               reports_dir: Path, sweep_json: Path | None = None,
                               iterative_json: Path | None = None, name: str = "optimization_results.md") -> list[Path]:
    from tunewise.reports.plots import plot_comparison, plot_seed_scores

    reports_dir = Path(reports_dir)
    sig, decision, diag = read_json(significance_path), read_json(decision_path), read_json(diagnosis_path)
    metric = sig.get("metric") or diag["metric"]
    direction = metric.get("direction", "max")
    base_metrics = read_json_if_exists(Path(baseline_run_dir) / "metrics.json")
    opt_metrics = read_json_if_exists(Path(optimized_run_dir) / "metrics.json") if optimized_run_dir else None
    significance = _significance_context(sig, direction)
    report, sig_report = reports_dir / name, reports_dir / "significance.md"

    histories = {"baseline": read_history(Path(baseline_run_dir))}
    best_steps = {"baseline": (base_metrics or {}).get("best_step")}
    if optimized_run_dir is not None:
        histories["optimized"] = read_history(Path(optimized_run_dir))
        best_steps["optimized"] = (opt_metrics or {}).get("best_step")
    curves = plot_comparison(histories, metric["name"], reports_dir / "plots" / "curves_comparison.png",
                             best_steps=best_steps, title=f"{diag['experiment']}: baseline vs optimized run")
    sides = {s["name"]: s["values"] for s in (significance["baseline"], significance["optimized"]) if s}
    seeds = plot_seed_scores(sides, metric["name"], reports_dir / "plots" / "seed_scores.png",
                             title=f"{diag['experiment']}: per-seed {metric['name']}")

    strategy = diag.get("strategy") or {}
    common = {"experiment": diag["experiment"], "trainer": diag.get("trainer"), "metric": metric,
              "sig": significance, "seeds_plot": link(seeds, report)}
    opt_config = reports_dir / "optimization_config.yaml"
    sweep = None
    if sweep_json is not None:
        from tunewise.reports.sweep import sweep_context

        sweep = sweep_context(Path(sweep_json), report, reports_dir / "plots")
    iterative = None
    if iterative_json is not None:
        from tunewise.reports.iterative import iterative_context

        iterative = iterative_context(Path(iterative_json), report, reports_dir / "plots")
    shown = "optimized" if optimized_run_dir is not None else "baseline"
    sections = trainer_sections(diag.get("trainer"), SectionContext(
        "optimization", report, reports_dir / "plots", "comparison", f"{diag['experiment']}: {shown}",
        {"baseline": Path(baseline_run_dir), "optimized": Path(optimized_run_dir) if optimized_run_dir else None},
        best_steps, shown, f"{shown} run"))
    text = render(
        "optimization_results.md.j2", **common, sections=sections,
        strategy={k: strategy.get(k) for k in ("requested", "chosen", "reason")},
        skipped=significance["skipped"], skip_reason=sig.get("reason") if significance["skipped"] else None,
        baseline_run=str(baseline_run_dir), optimized_run=str(optimized_run_dir) if optimized_run_dir else None,
        optimized_status=_run_summary(opt_metrics)["status"] if opt_metrics else None,
        comparison=_comparison(base_metrics, opt_metrics, metric["name"], direction),
        has_optimized_metrics=opt_metrics is not None,
        changes=_changes(diag),
        config_link=link(opt_config, report) if opt_config.exists() else None,
        decision={k: decision.get(k) for k in ("option", "label", "next", "chosen_side", "target", "target_met", "rationale",
                                               "criteria", "round")},
        curves_plot=link(curves, report),
        significance_link=link(sig_report, report),
        sweep=sweep,
        iterative=iterative,
    )
    atomic_write_text(report, text)
    atomic_write_text(sig_report, render("significance.md.j2", **common))
    return [report, sig_report, curves, seeds, *section_files(sections),
            *(sweep["written"] if sweep else []),
            *(iterative["written"] if iterative else [])]


# --- checklists, final report, index --------------------------------------------------------


def write_checklist(name: str, title: str, checks: list[dict], reports_dir: Path) -> Path:
    items = [
        {"label": c["label"], "ok": c.get("ok"), "required": bool(c.get("required")), "evidence": " ".join(str(c.get("evidence") or "").split())}
        for c in checks
    ]
    missing = [c["label"] for c in items if c["required"] and c["ok"] is False]
    path = Path(reports_dir) / "checklists" / f"{name}.md"
    atomic_write_text(path, render("checklist.md.j2", name=name, title=title, checks=items, missing=missing))
    return path


def write_final_report(final_path: Path, decision_path: Path, reports_dir: Path) -> list[Path]:
    final, decision = read_json(final_path), read_json(decision_path)
    report = Path(reports_dir) / "final_report.md"
    checkpoints = [
        {"name": name, "path": path, "link": link(Path(path), report)}
        for name, path in (final.get("checkpoints") or {}).items()
    ]
    run_dir = Path(final["run_dir"]) if final.get("run_dir") else None
    sections = trainer_sections(final.get("trainer"), SectionContext(
        "final", report, Path(reports_dir) / "plots", "final", "final model", {"validation": run_dir},
        {"validation": (final.get("val") or {}).get("best_step")}, "validation", "final run",
        tables_dir=Path(final["tables"]) if final.get("tables") else None, test_metrics=final.get("test") or {}))
    text = render(
        "final_report.md.j2", sections=sections,
        chosen_side=final.get("chosen_side"), config_path=final.get("config_path"), run_dir=final.get("run_dir"),
        val={"best": (final.get("val") or {}).get("best"), "best_step": (final.get("val") or {}).get("best_step")},
        test=list((final.get("test") or {}).items()), checkpoints=checkpoints,
        decision={k: decision.get(k) for k in ("option", "label", "next", "chosen_side", "target", "target_met", "rationale")},
    )
    atomic_write_text(report, text)
    return [report, *section_files(sections)]


def _experiment_dirs(results_dir: Path) -> Iterable[Path]:
    if not results_dir.is_dir():
        return []
    return sorted(
        d for d in results_dir.iterdir()
        if d.is_dir() and ((d / "experiment.yaml").exists() or (d / "diagnosis" / "diagnosis.json").exists())
    )


def _index_row(exp_dir: Path, reports_dir: Path, index: Path) -> dict:
    diag = read_json(exp_dir / "diagnosis" / "diagnosis.json")
    sig = read_json_if_exists(exp_dir / "significance" / "significance.json")
    decision = read_json_if_exists(exp_dir / "significance" / "decision.json")
    # over several rounds: the loop's conclusion, and the round whose optimized config it keeps
    concluded = read_json_if_exists(exp_dir / "loop" / "decision.json")
    kept = None
    if concluded:
        decision = concluded
        if concluded.get("config_side") == "optimized" and concluded.get("config_round", 1) > 1:
            kept = read_json_if_exists(exp_dir / f"round{concluded['config_round']}" / "significance" / "significance.json")
    final = read_json_if_exists(exp_dir / "final" / "final.json")
    metric = diag["metric"]
    row: dict[str, Any] = {
        "experiment": exp_dir.name, "trainer": diag.get("trainer"), "metric": metric["name"],
        "direction": metric.get("direction"), "baseline_mean": None, "baseline_std": None,
        "optimized_mean": None, "optimized_std": None, "verdict": None, "optimization_skipped": False,
        "decision": None, "test_metric": metric["name"].replace("val/", "test/", 1), "test_value": None,
    }
    if sig:
        row["baseline_mean"], row["baseline_std"] = sig["baseline"].get("mean"), sig["baseline"].get("std")
        if sig.get("skipped"):
            row["optimization_skipped"] = True
        elif isinstance((kept or sig).get("optimized"), dict):
            shown = kept or sig
            row["optimized_mean"], row["optimized_std"] = shown["optimized"].get("mean"), shown["optimized"].get("std")
        row["verdict"] = (kept or sig).get("verdict")
    else:
        # no multi-seed numbers yet: the single baseline run is all there is
        candidates = [exp_dir / "baseline" / "metrics.json"]
        if (diag.get("baseline") or {}).get("run_dir"):
            candidates.append(Path(diag["baseline"]["run_dir"]) / "metrics.json")
        metrics = next((read_json(p) for p in candidates if p.exists()), None)
        row["baseline_mean"] = (metrics or {}).get("primary", {}).get("best", (diag.get("baseline") or {}).get("best"))
    if decision:
        row["decision"] = {"option": decision.get("option"), "label": decision.get("label")}
    row["finalized"] = final is not None
    if final:
        row["test_value"] = (final.get("test") or {}).get(row["test_metric"])
    row["links"] = [
        {"name": name.removesuffix(".md").replace("_", " "), "href": link(reports_dir / exp_dir.name / name, index)}
        for name in REPORT_NAMES if (reports_dir / exp_dir.name / name).exists()
    ]
    checklists = reports_dir / exp_dir.name / "checklists"
    if checklists.is_dir():
        row["links"] += [{"name": f"checklist {p.stem}", "href": link(p, index)} for p in sorted(checklists.glob("*.md"))]
    return row


def write_index(results_dir: Path, reports_dir: Path) -> list[Path]:
    """reports/index.md and its overview plot (returned, index first)."""
    from tunewise.reports.plots import plot_overview

    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    index = reports_dir / "index.md"
    rows, not_run = [], []
    for exp_dir in _experiment_dirs(results_dir):
        if (exp_dir / "diagnosis" / "diagnosis.json").exists():
            rows.append(_index_row(exp_dir, reports_dir, index))
        else:
            not_run.append(exp_dir.name)
    plotted = [r for r in rows if number(r["baseline_mean"]) is not None]
    # drawn even with nothing to plot (a "no experiment recorded" panel): the report_index rule declares it
    plot = plot_overview(
        [{k: (number(r[k]) if k.endswith(("_mean", "_std")) else r[k])
          for k in ("experiment", "metric", "baseline_mean", "baseline_std", "optimized_mean", "optimized_std")}
         for r in plotted],
        reports_dir / "plots" / "index_overview.png",
    )
    text = render("index.md.j2", rows=rows, not_run=not_run, plot=link(plot, index))
    atomic_write_text(index, text)
    return [index, plot]
