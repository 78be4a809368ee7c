"""Checklist boxes are ticked by checks on files and numbers."""
import json
from pathlib import Path

import yaml

from tunewise.phases import gates
from tunewise.runs import RunDir


def _run(path: Path, status="done", epochs=3, checkpoints=True):
    run = RunDir(path)
    run.start({"optim": {"lr": 0.1}}, seed=0)
    run.write_history([{"step": s, "val/m": 0.5 + s / 10} for s in range(1, epochs + 1)])
    if checkpoints:
        for name in ("best.pt", "last.pt"):
            run.save_checkpoint(name, {"step": epochs})
    run.finish({"primary": {"name": "val/m", "direction": "max", "best": 0.8, "final": 0.8}, "epochs_run": epochs}, status=status)
    return run


def _diag(exp: Path, chosen="targeted", patch=None):
    patch = {"optim.lr": 0.3} if patch is None else patch
    d = {
        "strategy": {"requested": "auto", "chosen": chosen, "reason": "one root cause"},
        "findings": [{"id": "still_improving", "root_cause": "lr_too_low", "severity": "medium", "evidence": {"best_step": 3}}],
        "recommendations": [{"knob": "lr", "expected_impact": "high"}] if patch else [],
        "changes": [{"knob": "lr", "key": k, "old": 0.1, "new": v} for k, v in patch.items()],
        "patch": patch,
    }
    (exp / "diagnosis").mkdir(parents=True, exist_ok=True)
    (exp / "diagnosis" / "diagnosis.json").write_text(json.dumps(d))
    (exp / "diagnosis" / "optimization_config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.3}}))
    return d


def test_diagnostics_gate_ticks_from_files(tmp_path):
    exp, reports = tmp_path / "results" / "e", tmp_path / "reports" / "e"
    _run(exp / "baseline")
    _diag(exp)
    reports.mkdir(parents=True)
    checks = gates.diagnostics_checks(exp, reports)
    ok, missing = gates.passed(checks)
    assert not ok and missing == ["diagnostic_report.md with recommendations"]  # the report is not written yet
    (reports / "diagnostic_report.md").write_text("# report")
    assert gates.passed(gates.diagnostics_checks(exp, reports))[0]
    # a preview that does not carry the patch is caught
    (exp / "diagnosis" / "optimization_config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.1}}))
    assert gates.passed(gates.diagnostics_checks(exp, reports))[1] == ["Phase 4 configuration preview"]


def _sig(exp: Path, verdict="improved", chosen_side="optimized", option="A", n=3):
    d = exp / "significance"
    d.mkdir(parents=True, exist_ok=True)
    (d / "significance.json").write_text(json.dumps({
        "baseline": {"n": n, "mean": 0.7}, "optimized": {"n": n, "mean": 0.8}, "verdict": verdict,
        "p_one_sided": 0.01, "improvement_measured": 0.1}))
    (d / "decision.json").write_text(json.dumps({"option": option, "label": "x", "chosen_side": chosen_side,
                                                 "target_met": None, "rationale": "numbers"}))


def test_optimization_gate_requires_verified_improvement_only_when_claimed(tmp_path):
    exp, reports = tmp_path / "results" / "e", tmp_path / "reports" / "e"
    _run(exp / "baseline")
    _diag(exp)
    opt = _run(exp / "optimize" / "targeted")
    reports.mkdir(parents=True)
    (reports / "optimization_results.md").write_text("# results")
    _sig(exp)
    assert gates.passed(gates.optimization_checks(exp, reports, opt.path)) == (True, [])
    # claiming the optimized config without a verified improvement fails the gate
    _sig(exp, verdict="no_significant_change", chosen_side="optimized")
    ok, missing = gates.passed(gates.optimization_checks(exp, reports, opt.path))
    assert not ok and missing[0].startswith("Performance improvement verified")
    # reverting to the baseline (decision C) claims nothing: the box is not applicable
    _sig(exp, verdict="no_significant_change", chosen_side="baseline", option="C")
    checks = gates.optimization_checks(exp, reports, opt.path)
    box = next(c for c in checks if c["label"].startswith("Performance improvement"))
    assert box["ok"] is None and gates.passed(checks)[0]
    # missing checkpoints are caught
    (opt.checkpoints / "last.pt").unlink()
    assert "Optimized checkpoints saved" in gates.passed(gates.optimization_checks(exp, reports, opt.path))[1]


def test_optimization_gate_when_optimization_was_skipped(tmp_path):
    exp, reports = tmp_path / "results" / "e", tmp_path / "reports" / "e"
    _run(exp / "baseline")
    _diag(exp, chosen="none", patch={})
    reports.mkdir(parents=True)
    (reports / "optimization_results.md").write_text("# results")
    d = exp / "significance"
    d.mkdir(parents=True)
    (d / "significance.json").write_text(json.dumps({"skipped": True, "baseline": {"n": 3, "mean": 0.7}}))
    (d / "decision.json").write_text(json.dumps({"option": "D", "label": "ceiling", "chosen_side": "baseline", "rationale": "r"}))
    checks = gates.optimization_checks(exp, reports, None)
    assert gates.passed(checks) == (True, [])
    assert sum(c["ok"] is None for c in checks) >= 4


def test_diagnostics_gate_needs_recommendations_only_for_strategies_that_apply_them(tmp_path):
    exp, reports = tmp_path / "results" / "e", tmp_path / "reports" / "e"
    _run(exp / "baseline")
    reports.mkdir(parents=True)
    (reports / "diagnostic_report.md").write_text("# report")
    for chosen, passes in (("sweep", True), ("targeted", False), ("iterative", False)):
        _diag(exp, chosen=chosen, patch={})
        checks = {c["label"]: c for c in gates.diagnostics_checks(exp, reports)}
        assert gates.passed(list(checks.values()))[0] is passes, chosen
        if chosen == "sweep":
            assert "does not need any" in checks["diagnostic_report.md with recommendations"]["evidence"]
            assert "start from" in checks["Phase 4 configuration preview"]["evidence"]
