"""Checklist gates (seed 004): every box is ticked by a check on files and numbers.

A check is `{"label", "ok": True | False | None (not applicable), "required", "evidence"}`.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from tunewise.runs import RunDir, read_json, read_json_if_exists


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _check(label: str, ok: bool | None, evidence: str, required: bool = True) -> dict:
    return {"label": label, "ok": ok, "required": required, "evidence": evidence}


def _load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def diagnostics_checks(exp_dir: Path, reports_dir: Path) -> list[dict]:
    diag_path = exp_dir / "diagnosis" / "diagnosis.json"
    report = reports_dir / "diagnostic_report.md"
    opt_cfg = exp_dir / "diagnosis" / "optimization_config.yaml"
    diag = read_json_if_exists(diag_path)
    # the run the diagnosis read: the baseline, or a later round's starting run (tunewise.phases.rounds)
    baseline = RunDir((diag or {}).get("baseline", {}).get("run_dir") or exp_dir / "baseline")
    checks = []
    finished = baseline.is_finished()
    rows = len(baseline.history()) if finished else 0
    metrics = baseline.metrics() if finished else {}
    checks.append(_check(
        "Baseline training finished with a complete history",
        finished and rows == metrics.get("epochs_run", -1),
        f"status {baseline.status}, {rows} history rows, epochs_run {metrics.get('epochs_run')}",
    ))
    checks.append(_check("diagnosis.json written", diag is not None, str(diag_path)))
    if diag is None:
        return checks
    recs = diag.get("recommendations", [])
    chosen = diag["strategy"]["chosen"]
    # targeted and iterative apply the recommendations; a sweep searches its own space and may start from
    # an unchanged config, and `none` changes nothing
    # (a change the user forces with optimize.overrides is one to apply too)
    needs_recs = chosen in ("targeted", "iterative")
    forced = [c for c in diag.get("changes", []) if c.get("rationale") == "user override (optimize.overrides)"]
    checks.append(_check(
        "diagnostic_report.md with recommendations",
        report.exists() and (len(recs) > 0 or len(forced) > 0 or not needs_recs),
        f"{report.name} {'exists' if report.exists() else 'missing'}, {len(recs)} recommendations"
        + (f", {len(forced)} user override(s)" if forced else "")
        + ("" if recs or forced or needs_recs else f" (strategy {chosen} does not need any)"),
    ))
    findings = diag.get("findings", [])
    with_numbers = [f for f in findings if any(isinstance(v, (int, float)) for v in f.get("evidence", {}).values())]
    checks.append(_check(
        "Root cause analysis: every finding carries numeric evidence",
        len(with_numbers) == len(findings),
        f"{len(with_numbers)}/{len(findings)} findings with numbers",
    ))
    estimated = [r for r in recs if r.get("expected_impact")]
    checks.append(_check(
        "Expected improvement estimates for every recommendation",
        (len(estimated) == len(recs)) if recs else None,
        f"{len(estimated)}/{len(recs)} recommendations with an expected impact" if recs else "no recommendations",
    ))
    preview_ok = None
    evidence = "optimization skipped: no config change"
    if chosen == "sweep" and not diag["patch"]:
        preview_ok = opt_cfg.exists() or None
        evidence = f"no recommended change: the sweep's trials start from {opt_cfg.name} = the baseline config"
    elif chosen != "none":
        preview_ok = opt_cfg.exists()
        evidence = f"{opt_cfg.name} missing"
        if preview_ok:
            cfg = _load_yaml(opt_cfg)
            from tunewise.config import get_dotted

            applied = [k for k, v in diag["patch"].items() if get_dotted(cfg, k) == v]
            preview_ok = len(applied) == len(diag["patch"]) and len(applied) > 0
            evidence = f"{len(applied)}/{len(diag['patch'])} recommended changes applied in {opt_cfg.name}"
    checks.append(_check("Phase 4 configuration preview", preview_ok, evidence))
    checks.append(_check(
        "Optimization strategy chosen with a reason",
        bool(diag["strategy"].get("chosen")) and bool(diag["strategy"].get("reason")),
        f"{diag['strategy'].get('chosen')}: {diag['strategy'].get('reason')}",
    ))
    return checks


def optimization_checks(exp_dir: Path, reports_dir: Path, optimize_run: Path | None) -> list[dict]:
    diag = read_json(exp_dir / "diagnosis" / "diagnosis.json")
    sig_path = exp_dir / "significance" / "significance.json"
    dec_path = exp_dir / "significance" / "decision.json"
    sig = read_json_if_exists(sig_path)
    dec = read_json_if_exists(dec_path)
    skipped = diag["strategy"]["chosen"] == "none"
    checks = []
    opt_cfg = exp_dir / "diagnosis" / "optimization_config.yaml"
    checks.append(_check(
        "optimization_config.yaml created with Phase 3 recommendations",
        None if skipped else (opt_cfg.exists() and (len(diag.get("changes", [])) > 0 or diag["strategy"]["chosen"] == "sweep")),
        "optimization skipped by the diagnosis" if skipped else f"{len(diag.get('changes', []))} changes in {opt_cfg}",
    ))
    run = RunDir(optimize_run) if optimize_run else None
    checks.append(_check(
        "Optimized training completed successfully",
        None if skipped else (run is not None and run.status == "done"),
        "optimization skipped" if skipped else f"{optimize_run}: status {run.status if run else 'missing'}",
    ))
    results_md = reports_dir / "optimization_results.md"
    checks.append(_check("optimization_results.md generated", results_md.exists(), str(results_md)))
    compared = sig is not None and (sig.get("skipped") or ("optimized" in sig and "baseline" in sig))
    checks.append(_check(
        "Baseline vs optimized comparison documented",
        bool(compared) if not skipped else None,
        "optimization skipped" if skipped else (
            f"baseline {sig['baseline']['mean']:.4g} vs optimized {sig['optimized']['mean']:.4g}" if compared else "significance.json missing"
        ),
    ))
    # over several rounds (seed 004's loop), the decision is the loop's conclusion and the improvement it claims
    # is the one verified in the round whose optimized config it keeps
    final = read_json_if_exists(exp_dir / "loop" / "decision.json")
    if final is not None:
        dec = final
        if final.get("config_side") == "optimized":
            from tunewise.phases.rounds import round_dir

            sig = read_json_if_exists(round_dir(exp_dir, final.get("config_round", 1)) / "significance" / "significance.json")
    claims_improvement = bool(dec) and dec.get("chosen_side") == "optimized"
    verified = bool(sig) and not sig.get("skipped") and (sig.get("verdict") == "improved" or bool(dec and dec.get("target_met")))
    checks.append(_check(
        "Performance improvement verified (>= min_improvement and significant, or target met)",
        verified if claims_improvement else None,
        (f"verdict {sig.get('verdict')}, one-sided p {_num(sig.get('p_one_sided'))}, "
         f"improvement {_num(sig.get('improvement_measured'))} ({sig.get('improvement_measured_as', 'n/a')})"
         if claims_improvement else "no improvement claimed: the decision keeps the baseline config"),
        required=claims_improvement,
    ))
    n_base = sig["baseline"]["n"] if sig else 0
    n_opt = sig.get("optimized", {}).get("n", 0) if sig and not sig.get("skipped") else None
    checks.append(_check(
        "Improvements reproducible (multiple seeds)",
        n_base >= 2 and (n_opt is None or n_opt >= 2),
        f"{n_base} baseline seeds" + (f", {n_opt} optimized seeds" if n_opt is not None else ""),
    ))
    ckpt_ok = None
    evidence = "optimization skipped"
    if not skipped and run is not None:
        names = [n for n in ("best.pt", "last.pt") if (run.checkpoints / n).exists()]
        ckpt_ok = len(names) == 2
        evidence = f"{', '.join(names) or 'none'} in {run.checkpoints}"
    checks.append(_check("Optimized checkpoints saved", ckpt_ok, evidence))
    checks.append(_check(
        "Decision made: Phase 5, iterate, or re-analyze",
        bool(dec) and dec.get("option") in ("A", "B", "C", "D") and bool(dec.get("rationale")),
        f"option {dec.get('option')}: {dec.get('label')}" if dec else "decision.json missing",
    ))
    return checks


def passed(checks: list[dict]) -> tuple[bool, list[str]]:
    missing = [c["label"] for c in checks if c["required"] and c["ok"] is False]
    return not missing, missing


# --- the phase, as `tunewise gate` runs it ------------------------------------------------------------------


def optimize_run_dir(exp_dir: Path, diag: dict, given: str | Path | None = None) -> Path | None:
    """The run directory the chosen strategy stands on: `given` (--optimize-run), the targeted run, or the run
    behind a sweep's or iterative chain's best.json (None when optimization was skipped)."""
    if given:
        return Path(given)
    chosen = diag["strategy"]["chosen"]
    if chosen == "none":
        return None
    out = Path(exp_dir) / "optimize" / chosen
    best = out / "best.json"
    return Path(read_json(best)["run_dir"]) if best.exists() else out


TITLES = {"diagnostics": "Phase 3 diagnostics complete", "optimization_complete": "Phase 4 optimization complete"}


def gate(exp: dict, exp_dir: Path, name: str, out: Path, reports_dir: Path, *, write_checklist=None,
         optimize_run: str | Path | None = None, rule: str | None = None) -> dict:
    """The checklist `name`: rendered by `write_checklist(name, title, checks, reports_dir)`, written to `out`
    (gate.json) unless a required box is unticked and gates.enforce is on (then a CliError naming them)."""
    from tunewise.phases import CliError
    from tunewise.runs import write_json

    exp_dir, reports_dir, out = Path(exp_dir), Path(reports_dir), Path(out)
    if name == "diagnostics":
        checks = diagnostics_checks(exp_dir, reports_dir)
    elif name == "optimization_complete":
        opt = optimize_run_dir(exp_dir, read_json(exp_dir / "diagnosis" / "diagnosis.json"), optimize_run)
        checks = optimization_checks(exp_dir, reports_dir, opt)
    else:
        raise CliError(f"unknown gate {name!r}")
    checklist = write_checklist(name, TITLES[name], checks, reports_dir) if write_checklist is not None else None
    ok, missing = passed(checks)
    blocked = not ok and exp["gates"]["enforce"]
    result = {"gate": name, "passed": ok, "enforced": exp["gates"]["enforce"], "checks": checks}
    if blocked:
        out.unlink(missing_ok=True)
    else:
        write_json(out, result)
    if rule is not None:  # as a workflow job: the checklist (and the gate, when passed) on the `workflow` run
        from tunewise.phases import tracked

        logged = {checklist: "reports/checklists"} if checklist is not None else {}
        tracked.log_experiment_files(exp, exp_dir, rule, logged | ({} if blocked else {out: "gates"}))
    if blocked:
        raise CliError(
            f"gate {name} of {exp['name']} failed: required box(es) unticked: "
            + "; ".join(missing) + f" (see {reports_dir / 'checklists' / (name + '.md')}; gates.enforce: false to proceed anyway)"
        )
    print(f"gate {name}: {'passed' if ok else 'NOT passed (not enforced)'}")
    return result
