"""Reports quote the workflow's files: every number checked here is read from a fixture file."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tunewise.config import commented_config
from tunewise.reports import plots
from tunewise.reports.render import (
    fmt,
    pct,
    write_checklist,
    write_diagnostic_report,
    write_final_report,
    write_index,
    write_optimization_results,
)
from tunewise.runs import RunDir, write_json

METRIC = "val/r2_mean"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- fixtures ---------------------------------------------------------------------------------


def _config(lr: float = 0.001, dropout: float = 0.1) -> dict:
    return {
        "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "momentum": 0.9, "param_groups": {}},
        "schedule": {"name": "cosine", "warmup_epochs": 1, "lr_end_factor": 0.01},
        "train": {"epochs": 20, "batch_size": 64, "grad_clip": None, "patience": 4, "min_delta": 0.0, "amp": False},
        "model": {"hidden": [128, 64], "latent_dim": 16, "dropout": dropout},
        "data": {"noise": 0.0},
    }


def _make_run(path: Path, config: dict, *, peak: float, best_step: int, epochs: int, wall: float,
              samples_per_s: float, train_slope: float = 0.061, seed: int = 0) -> dict:
    """A finished run directory whose history has its best validation value at `best_step`."""
    run = RunDir(path)
    run.start(config, seed=seed)
    rows = []
    for step in range(1, epochs + 1):
        val = peak - 0.0137 * abs(step - best_step) ** 1.3
        rows.append({
            "step": step, "train/loss": 1.9 / step + 0.0421, "val/loss": 0.31 + 0.0093 * abs(step - best_step),
            "train/r2_mean": min(0.97, 0.41 + train_slope * step), "val/r2_mean": val, "val/mae_mean": 0.5 - val / 3,
            "lr": config["optim"]["lr"] * (1 - step / (epochs + 1)), "grad_norm": 2.3 / step, "grad_norm_p90": 3.1 / step,
            "grad_clip_frac": 0.0, "seconds": wall / epochs, "samples_per_s": samples_per_s, "data_frac": 0.12,
        })
    run.write_history(rows)
    best, last = rows[best_step - 1], rows[-1]
    metrics = {
        "primary": {"name": METRIC, "direction": "max", "best": best[METRIC], "final": last[METRIC]},
        "best_step": best_step, "epochs_run": epochs, "epochs_planned": 20, "stopped_early": epochs < 20,
        "final": last, "best": best, "wall_seconds": wall, "samples_per_s": samples_per_s, "device": "cpu",
    }
    run.finish(metrics)
    return json.loads(run.metrics_path.read_text())


@pytest.fixture
def experiment(tmp_path):
    """results/<exp>/ with a baseline run, a diagnosis and an optimized run, like the workflow writes."""
    exp = tmp_path / "results" / "latent_demo"
    base_metrics = _make_run(exp / "baseline", _config(), peak=0.712683, best_step=5, epochs=11, wall=41.37,
                             samples_per_s=1843.26, train_slope=0.089)
    changes = [
        {"knob": "dropout", "key": "model.dropout", "old": 0.1, "new": 0.35, "action": "increase",
         "rationale": "train-val gap 0.2573 at the best step and validation falling after it",
         "expected_impact": "high", "risk": "low", "effort": "low"},
        {"knob": "lr", "key": "optim.lr", "old": 0.001, "new": 0.0004, "action": "decrease",
         "rationale": "validation loss noisy after the best step", "expected_impact": "medium", "risk": "low",
         "effort": "low"},
    ]
    diagnosis = {
        "experiment": "latent_demo", "trainer": "latent", "metric": {"name": METRIC, "direction": "max"},
        "baseline": {"run_dir": str(exp / "baseline"), "best": base_metrics["primary"]["best"],
                     "final": base_metrics["primary"]["final"], "best_step": 5, "epochs_run": 11},
        "findings": [
            {"id": "overfitting", "root_cause": "overfitting", "severity": "high",
             "summary": "training keeps improving while validation falls",
             "evidence": {"train_val_gap": 0.257318, "val_drop_after_best": 0.083172, "best_step": 5}},
            {"id": "best_step_early", "root_cause": "saturated_early", "severity": "low", "summary": "best in the first half",
             "evidence": {"best_step_frac": 0.454545}},
        ],
        "recommendations": [
            {"knob": "dropout", "action": "increase", "value": 0.35, "rationale": "regularise the encoder",
             "expected_impact": "high", "risk": "low", "effort": "low", "root_cause": "overfitting", "finding_id": "overfitting"},
            {"knob": "lr", "action": "decrease", "value": 0.0004, "rationale": "smoother late training",
             "expected_impact": "medium", "risk": "low", "effort": "low", "root_cause": "overfitting", "finding_id": "overfitting"},
            {"knob": "epochs", "action": "decrease", "value": 8, "rationale": "best step at 45% of the run",
             "expected_impact": "low", "risk": "medium", "effort": "low", "root_cause": "saturated_early", "finding_id": "best_step_early"},
        ],
        "changes": changes,
        "patch": {"model.dropout": 0.35, "optim.lr": 0.0004},
        "strategy": {"requested": "auto", "chosen": "targeted", "reason": "one clear root cause: overfitting"},
    }
    write_json(exp / "diagnosis" / "diagnosis.json", diagnosis)
    opt_config = _config(lr=0.0004, dropout=0.35)
    (exp / "diagnosis" / "optimization_config.yaml").write_text(commented_config(opt_config, changes))
    opt_metrics = _make_run(exp / "optimize" / "targeted", opt_config, peak=0.768419, best_step=9, epochs=14,
                            wall=58.91, samples_per_s=1702.55, train_slope=0.041)
    (exp / "experiment.yaml").write_text(yaml.safe_dump({"name": "latent_demo", "trainer": "latent"}))
    return {"exp": exp, "diagnosis": diagnosis, "base": base_metrics, "opt": opt_metrics,
            "reports": tmp_path / "reports" / "latent_demo"}


def _significance(exp: Path) -> dict:
    seeds = [0, 1, 2, 3, 4]
    base_vals = [0.712683, 0.70418, 0.721907, 0.698245, 0.716032]
    opt_vals = [0.768419, 0.759304, 0.774816, 0.751129, 0.770583]
    sig = {
        "metric": {"name": METRIC, "direction": "max"}, "seeds": seeds,
        "baseline": {"n": 5, "mean": 0.7106134, "std": 0.0093571, "values": base_vals,
                     "runs": [f"results/latent_demo/seeds/baseline/seed{s}" for s in seeds]},
        "optimized": {"n": 5, "mean": 0.7648502, "std": 0.0094863, "values": opt_vals,
                      "runs": [f"results/latent_demo/seeds/optimized/seed{s}" for s in seeds]},
        "diff": 0.0542368, "improvement": 0.0542368, "improvement_rel": 0.0763239, "improvement_measured": 0.0763239,
        "mode": "relative", "alpha": 0.05, "min_improvement": 0.03, "p_two_sided": 0.00000412, "p_one_sided": 0.00000206,
        "ci_low": 0.0437251, "ci_high": 0.0649912, "effect_size_g": 5.1873, "seed004_rule": True,
        "verdict": "improved", "reason": "significant at alpha 0.05 and 7.6% >= 3%",
    }
    write_json(exp / "significance" / "significance.json", sig)
    return sig


def _decision(exp: Path, option: str = "A", side: str = "optimized") -> dict:
    decision = {"option": option, "label": "performance meets requirements", "next": "Phase 5: finalization",
                "chosen_side": side, "target": 0.75, "target_met": True,
                "rationale": "optimized mean 0.7649 reaches the target 0.75"}
    write_json(exp / "significance" / "decision.json", decision)
    return decision


def _final(exp: Path) -> dict:
    final = {
        "chosen_side": "optimized", "decision": "A", "config_path": str(exp / "final" / "final_config.yaml"),
        "run_dir": str(exp / "final" / "run"), "val": {"best": 0.7713847, "best_step": 10},
        "test": {"test/r2_mean": 0.7528163, "test/mae_mean": 0.2318745, "test/loss": 0.3327718},
        "checkpoints": {"best": str(exp / "final" / "best_model_optimized.pt"),
                        "last": str(exp / "final" / "last_model_optimized.pt")},
    }
    write_json(exp / "final" / "final.json", final)
    return final


def _assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 200 and height > 150 and len(data) > 5000, (path, width, height, len(data))


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", text)


# --- formatting -------------------------------------------------------------------------------


def test_fmt_and_pct_format_numbers_from_files():
    assert fmt(0.71268345) == "0.7127"
    assert fmt(1843.26) == "1843"
    assert fmt(0.00000206) == "2.06e-06"
    assert fmt(12) == "12" and fmt(12, signed=True) == "+12"
    assert fmt(-0.0542368, signed=True) == "-0.05424" and fmt(0.0542368, signed=True) == "+0.05424"
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    assert fmt("inf") == "inf" and fmt(float("-inf")) == "-inf"  # runs.write_json stores inf as a string
    assert fmt(True) == "yes" and fmt("targeted") == "targeted"
    assert fmt([0.5, None]) == "[0.5, n/a]"
    assert pct(0.0763239) == "7.632%" and pct(0.03) == "3%" and pct(-0.012, signed=True) == "-1.2%"
    assert pct(None) == "n/a" and pct(float("nan")) == "n/a"


# --- commented config -------------------------------------------------------------------------


def test_commented_config_round_trips_and_comments_the_nested_line():
    config = {  # `lr` under three parents; the changed one comes first, so a match by bare name would miss it
        "finetune": {"lr": 0.0001, "epochs": 3},
        "optim": {"name": "adamw", "lr": 0.001, "param_groups": {"head": {"lr": 0.01}}},
        "model": {"hidden": [64, 32], "dropout": 0.2, "note": "x " * 60},
        "train": {"grad_clip": None, "extra": {}},
    }
    changes = [
        {"key": "finetune.lr", "old": 0.00005, "new": 0.0001, "rationale": "still improving\nat the end"},
        {"key": "model.hidden", "old": [32, 16], "new": [64, 32], "rationale": "underfitting: train r2 0.41"},
        {"key": "model.note", "old": "", "new": "x", "rationale": "r" * 300},
        {"key": "train.extra", "old": None, "new": {}, "rationale": "placeholder"},
    ]
    text = commented_config(config, changes)
    assert yaml.safe_load(text) == config
    lines = text.splitlines()
    commented = [line for line in lines if "# CHANGED" in line and not line.startswith("#")]
    assert len(commented) == 4
    # the finetune section's lr carries the comment, optim's lr and param group lr do not
    finetune = lines.index("finetune:")
    assert lines[finetune + 1].startswith("  lr: 0.0001  # CHANGED from 5.0e-05: still improving at the end")
    assert all("CHANGED" not in line for line in lines if line.strip().startswith("lr:") and line is not lines[finetune + 1])
    # a block collection takes the comment on its key line; the long rationale is shortened to one line
    assert next(line for line in lines if line.startswith("  hidden:")).endswith("# CHANGED from [32, 16]: underfitting: train r2 0.41")
    assert max(len(line) for line in commented if "rrr" in line) < 260
    # the header lists every change
    header = [line for line in lines if line.startswith("#")]
    assert "# Changes from the baseline config (4):" in header
    assert any(line.startswith("#   finetune.lr: 5.0e-05 -> 0.0001") for line in header)


def test_commented_config_without_changes_is_the_plain_config():
    config = _config()
    text = commented_config(config, [])
    assert yaml.safe_load(text) == config and "CHANGED" not in text


# --- diagnostic report ------------------------------------------------------------------------


def test_diagnostic_report_quotes_the_baseline_and_the_diagnosis(experiment):
    exp, reports, diag, base = experiment["exp"], experiment["reports"], experiment["diagnosis"], experiment["base"]
    written = write_diagnostic_report(exp / "diagnosis" / "diagnosis.json", exp / "baseline", reports)
    report = reports / "diagnostic_report.md"
    assert report in written and (reports / "plots" / "baseline_curves.png") in written
    text = report.read_text()
    for value in (base["primary"]["best"], base["primary"]["final"], base["best_step"], base["epochs_run"],
                  base["wall_seconds"], base["samples_per_s"]):
        assert fmt(value) in text, value
    for finding in diag["findings"]:
        assert finding["id"] in text
        for name, value in finding["evidence"].items():
            assert f"{name} = {fmt(value)}" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 3
    for rank, (row, rec) in enumerate(zip(rows, diag["recommendations"]), 1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [str(rank), rec["knob"], rec["action"], fmt(rec["value"]), rec["expected_impact"], rec["risk"],
                         rec["effort"], rec["rationale"]]
    assert diag["strategy"]["reason"] in text and "**targeted**" in text
    # config preview: a unified diff of the baseline config.yaml against the optimization config
    diff = text.split("```diff\n", 1)[1].split("```", 1)[0]
    assert "--- baseline/config.yaml" in diff and "+++ optimization_config.yaml" in diff
    assert "-  lr: 0.001\n" in diff and "+  lr: 0.0004  # CHANGED from 0.001" in diff
    assert "-  dropout: 0.1\n" in diff
    copied = reports / "optimization_config.yaml"
    assert copied in written
    assert copied.read_text() == (exp / "diagnosis" / "optimization_config.yaml").read_text()
    for link in _links(text):
        assert (report.parent / link).exists(), link
    assert "plots/baseline_curves.png" in _links(text)
    _assert_png(reports / "plots" / "baseline_curves.png")


def test_diagnostic_report_previews_the_patch_when_no_config_file_exists(experiment):
    exp, reports = experiment["exp"], experiment["reports"]
    (exp / "diagnosis" / "optimization_config.yaml").unlink()
    write_diagnostic_report(exp / "diagnosis" / "diagnosis.json", exp / "baseline", reports)
    text = (reports / "diagnostic_report.md").read_text()
    assert "+  dropout: 0.35  # CHANGED from 0.1" in text
    assert yaml.safe_load((reports / "optimization_config.yaml").read_text())["model"]["dropout"] == 0.35


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_diagnostic_report_has_a_data_section_from_the_data_checks(experiment):
    exp, reports = experiment["exp"], experiment["reports"]
    path = exp / "diagnosis" / "diagnosis.json"
    write_diagnostic_report(path, exp / "baseline", reports)
    assert "reported no data checks" in _section((reports / "diagnostic_report.md").read_text(), "Data")
    diag = json.loads(path.read_text())
    diag["data_checks"] = {
        "rows": {"read": 203, "kept": 200},
        "dropped": [{"count": 3, "reason": "unparsable formula", "where": "my.csv column formula",
                     "examples": ["Xx2", "??", "Q"]}],
        "warnings": ["no OCR records: every text view is empty; set data.ocr_dir"],
        "notes": ["featurised 200 formulas with Magpie"],
    }
    path.write_text(json.dumps(diag))
    write_diagnostic_report(path, exp / "baseline", reports)
    data = _section((reports / "diagnostic_report.md").read_text(), "Data")
    assert "| read | 203 |" in data and "| kept | 200 |" in data
    assert "| 3 | unparsable formula | my.csv column formula | Xx2, ??, Q |" in data
    assert "- no OCR records: every text view is empty; set data.ocr_dir" in data
    assert "- featurised 200 formulas with Magpie" in data


# --- optimization results and significance ----------------------------------------------------


def test_optimization_results_compare_runs_and_quote_significance(experiment):
    exp, reports, base, opt = experiment["exp"], experiment["reports"], experiment["base"], experiment["opt"]
    sig, decision = _significance(exp), _decision(exp)
    written = write_optimization_results(exp / "significance" / "significance.json",
                                         exp / "significance" / "decision.json", exp / "diagnosis" / "diagnosis.json",
                                         exp / "baseline", exp / "optimize" / "targeted", reports)
    report, sig_report = reports / "optimization_results.md", reports / "significance.md"
    assert set(written) == {report, sig_report, reports / "plots" / "curves_comparison.png",
                            reports / "plots" / "seed_scores.png"}
    text = report.read_text()

    def row(label: str) -> list[str]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        return [c.strip() for c in line.strip("|").split("|")][1:]

    assert row(f"{METRIC} best") == [fmt(base["primary"]["best"]), fmt(opt["primary"]["best"]),
                                     fmt(opt["primary"]["best"] - base["primary"]["best"], signed=True)]
    assert row("epochs to best") == ["5", "9", "+4"]
    assert row("epochs run") == ["11", "14", "+3"]
    assert row("time per epoch (s)")[:2] == [fmt(base["wall_seconds"] / 11), fmt(opt["wall_seconds"] / 14)]
    assert row("samples/s")[:2] == [fmt(base["samples_per_s"]), fmt(opt["samples_per_s"])]
    gap = base["best"]["train/r2_mean"] - base["best"]["val/r2_mean"]
    assert row("train-val gap of r2_mean at best step")[0] == fmt(gap)
    # configuration changes from diagnosis.json
    assert "| `model.dropout` | dropout | 0.1 | 0.35 | increase |" in text
    assert "| `optim.lr` | lr | 0.001 | 0.0004 | decrease |" in text
    # significance: both sides, every seed, the tests and the verdict
    for side in ("baseline", "optimized"):
        assert f"| {side} | 5 | {fmt(sig[side]['mean'])} ± {fmt(sig[side]['std'])} |" in text
    for seed, b, o in zip(sig["seeds"], sig["baseline"]["values"], sig["optimized"]["values"]):
        assert f"| {seed} | {fmt(b)} | {fmt(o)} |" in text
    for key in ("p_one_sided", "p_two_sided", "effect_size_g", "alpha"):
        assert fmt(sig[key]) in text, key
    assert f"[{fmt(sig['ci_low'])}, {fmt(sig['ci_high'])}]" in text
    assert fmt(sig["diff"], signed=True) in text and pct(sig["improvement_rel"], signed=True) in text
    assert f"{pct(sig['improvement_measured'], signed=True)} / {pct(sig['min_improvement'])}" in text
    bound = sig["optimized"]["mean"] - 2 * sig["optimized"]["std"]
    assert f"holds ({fmt(bound)} vs {fmt(sig['baseline']['mean'])})" in text
    assert f"**Verdict: improved.** {sig['reason']}" in text
    # the decision
    assert f"Option {decision['option']} ({decision['label']})" in text
    assert decision["rationale"] in text and decision["next"] in text and fmt(decision["target"]) in text
    # significance.md is the significance section alone
    sig_text = sig_report.read_text()
    assert f"| optimized | 5 | {fmt(sig['optimized']['mean'])} ± {fmt(sig['optimized']['std'])} |" in sig_text
    assert fmt(sig["p_one_sided"]) in sig_text and "Baseline vs optimized" not in sig_text
    for path in (report, sig_report):
        for link in _links(path.read_text()):
            assert (path.parent / link).exists(), link
    _assert_png(reports / "plots" / "curves_comparison.png")
    _assert_png(reports / "plots" / "seed_scores.png")


def test_optimization_results_follow_the_file_values(experiment):
    """Change a number in significance.json and the report changes with it: no constant in a template."""
    exp, reports = experiment["exp"], experiment["reports"]
    sig = _significance(exp)
    _decision(exp, option="C", side="baseline")
    sig.update({"p_one_sided": 0.3187, "verdict": "no_significant_change", "reason": "p 0.3187 above alpha",
                "seed004_rule": False, "mode": "absolute", "improvement_measured": 0.0021, "min_improvement": 0.01})
    # phases/significance.py's own layout: the interval nested under `ci`, the effect size as `hedges_g`
    for key in ("ci_low", "ci_high", "effect_size_g"):
        del sig[key]
    sig.update({"ci": {"level": 0.9, "low": -0.01183, "high": 0.02291, "method": "percentile bootstrap",
                       "of": "improvement"}, "hedges_g": 0.4127})
    write_json(exp / "significance" / "significance.json", sig)
    write_optimization_results(exp / "significance" / "significance.json", exp / "significance" / "decision.json",
                               exp / "diagnosis" / "diagnosis.json", exp / "baseline", exp / "optimize" / "targeted", reports)
    text = (reports / "optimization_results.md").read_text()
    assert "0.3187" in text and "**Verdict: no_significant_change.**" in text and "does not hold" in text
    assert "+0.0021 / 0.01" in text and "Option C" in text
    assert "| percentile bootstrap CI (90%) of improvement | [-0.01183, 0.02291] |" in text
    assert "| Hedges' g | 0.4127 |" in text


def test_optimization_results_when_optimization_was_skipped(experiment):
    exp, reports, base = experiment["exp"], experiment["reports"], experiment["base"]
    values = [0.712683, 0.70418, 0.721907]
    write_json(exp / "significance" / "significance.json", {
        "skipped": True, "reason": "baseline 0.7127 already meets the target 0.7",
        "baseline": {"n": 3, "mean": 0.7129233, "std": 0.0088653, "values": values, "runs": ["s0", "s1", "s2"]},
        "metric": {"name": METRIC, "direction": "max"}, "seeds": [0, 1, 2], "mode": "relative", "alpha": 0.05,
        "min_improvement": 0.03,
    })
    _decision(exp, option="A", side="baseline")
    written = write_optimization_results(exp / "significance" / "significance.json",
                                         exp / "significance" / "decision.json", exp / "diagnosis" / "diagnosis.json",
                                         exp / "baseline", None, reports)
    text = (reports / "optimization_results.md").read_text()
    assert "Optimization was skipped: baseline 0.7127 already meets the target 0.7" in text
    assert "| baseline | 3 | 0.7129 ± 0.008865 |" in text
    for seed, value in zip((0, 1, 2), values):
        assert f"| {seed} | {fmt(value)} |" in text
    assert "| seed | baseline | optimized |" not in text and "Verdict" not in text
    assert f"| {METRIC} best | {fmt(base['primary']['best'])} |" in text
    assert "skipped" in (reports / "significance.md").read_text()
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)


# --- checklist, final report, index -----------------------------------------------------------


def test_checklist_renders_ticked_unticked_and_not_applicable(tmp_path):
    checks = [
        {"label": "Baseline training finished", "ok": True, "required": True, "evidence": "status done, 11 rows"},
        {"label": "Optimized checkpoints saved", "ok": False, "required": True, "evidence": "none in ckpt/"},
        {"label": "Nice plots", "ok": False, "required": False, "evidence": "missing"},
        {"label": "Performance improvement verified", "ok": None, "required": False, "evidence": "no improvement\nclaimed"},
    ]
    path = write_checklist("optimization_complete", "Phase 4 optimization complete", checks, tmp_path)
    assert path == tmp_path / "checklists" / "optimization_complete.md"
    lines = path.read_text().splitlines()
    assert "- [x] Baseline training finished (required) — status done, 11 rows" in lines
    assert "- [ ] Optimized checkpoints saved (required) — none in ckpt/" in lines
    assert "- [ ] Nice plots — missing" in lines
    assert "- [~] Performance improvement verified — n/a: no improvement claimed" in lines
    assert "does not pass" in lines[-1] and "Optimized checkpoints saved" in lines[-1] and "Nice plots" not in lines[-1]
    checks[1]["ok"] = True
    lines = write_checklist("optimization_complete", "Phase 4", checks, tmp_path).read_text().splitlines()
    assert "passes" in lines[-1] and "does not" not in lines[-1]


def test_final_report_quotes_final_and_decision(experiment):
    exp, reports = experiment["exp"], experiment["reports"]
    final, decision = _final(exp), _decision(exp)
    (path,) = write_final_report(exp / "final" / "final.json", exp / "significance" / "decision.json", reports)
    text = path.read_text()
    assert "**optimized**" in text and f"Option {decision['option']}" in text and decision["rationale"] in text
    for name, value in final["test"].items():
        assert f"| `{name}` | {fmt(value)} |" in text
    assert fmt(final["val"]["best"]) in text and "evaluated once" in text
    for name, ckpt in final["checkpoints"].items():
        assert f"- {name}: [`{ckpt}`]" in text
    # links point at the checkpoints from the report's folder
    for link in _links(text):
        assert (path.parent / link).resolve() in {Path(p).resolve() for p in final["checkpoints"].values()}


def test_index_lists_every_experiment_with_its_numbers(experiment, tmp_path):
    exp, reports = experiment["exp"], experiment["reports"]
    sig, decision, final = _significance(exp), _decision(exp), _final(exp)
    write_diagnostic_report(exp / "diagnosis" / "diagnosis.json", exp / "baseline", reports)
    write_optimization_results(exp / "significance" / "significance.json", exp / "significance" / "decision.json",
                               exp / "diagnosis" / "diagnosis.json", exp / "baseline", exp / "optimize" / "targeted", reports)
    # a second experiment diagnosed but not yet through significance, a third not run at all
    other = tmp_path / "results" / "pez_demo"
    other_metrics = _make_run(other / "baseline", _config(), peak=0.391742, best_step=3, epochs=6, wall=9.1,
                              samples_per_s=211.4)
    write_json(other / "diagnosis" / "diagnosis.json", {**experiment["diagnosis"], "experiment": "pez_demo",
                                                         "trainer": "pez", "baseline": {"run_dir": str(other / "baseline")}})
    (tmp_path / "results" / "textcaps_demo").mkdir()
    (tmp_path / "results" / "textcaps_demo" / "experiment.yaml").write_text("name: textcaps_demo\n")
    (tmp_path / "results" / "logs").mkdir()  # not an experiment

    index, _ = write_index(tmp_path / "results", tmp_path / "reports")
    assert index == tmp_path / "reports" / "index.md"
    text = index.read_text()
    demo = next(line for line in text.splitlines() if line.startswith("| latent_demo |"))
    assert f"{fmt(sig['baseline']['mean'])} ± {fmt(sig['baseline']['std'])}" in demo
    assert f"{fmt(sig['optimized']['mean'])} ± {fmt(sig['optimized']['std'])}" in demo
    assert "| improved |" in demo and f"| {decision['option']} (" in demo
    assert f"`test/r2_mean` {fmt(final['test']['test/r2_mean'])}" in demo
    pez = next(line for line in text.splitlines() if line.startswith("| pez_demo |"))
    assert f"{fmt(other_metrics['primary']['best'])} (single run)" in pez and "pending" in pez
    assert "| textcaps_demo | not run yet |" in text and "| logs |" not in text
    links = _links(text)
    assert "latent_demo/diagnostic_report.md" in links and "latent_demo/optimization_results.md" in links
    for link in links:
        assert (index.parent / link).exists(), link
    _assert_png(tmp_path / "reports" / "plots" / "index_overview.png")


def test_templates_dir_can_be_overridden(experiment, tmp_path, monkeypatch):
    custom = tmp_path / "templates"
    custom.mkdir()
    (custom / "checklist.md.j2").write_text("{{ title }}: {{ checks|length }} checks, first {{ checks[0].evidence }}\n")
    monkeypatch.setenv("TUNEWISE_TEMPLATES", str(custom))
    path = write_checklist("g", "Gate", [{"label": "a", "ok": True, "required": True, "evidence": "0.5"}], tmp_path)
    assert path.read_text() == "Gate: 1 checks, first 0.5\n"


# --- plots ------------------------------------------------------------------------------------


def test_plots_survive_a_diverged_history(tmp_path):
    history = pd.DataFrame({
        "step": [1, 2, 3, 4], "train/loss": [2.1, 1.4, float("inf"), float("nan")],
        "val/loss": [2.3, 1.9, float("nan"), float("nan")], METRIC: [0.1, 0.2, float("nan"), float("nan")],
        "lr": [0.1, 0.1, 0.1, 0.1],
    })
    _assert_png(plots.plot_curves(history, METRIC, 2, tmp_path / "a.png"))
    _assert_png(plots.plot_curves(pd.DataFrame(), METRIC, None, tmp_path / "empty.png"))
    _assert_png(plots.plot_comparison({"baseline": history, "optimized": pd.DataFrame()}, METRIC, tmp_path / "b.png"))
    _assert_png(plots.plot_seed_scores({"baseline": [0.7, None, math.nan, 0.71]}, METRIC, tmp_path / "c.png"))
    _assert_png(plots.plot_overview([{"experiment": "e", "metric": METRIC, "baseline_mean": 0.7, "baseline_std": None,
                                      "optimized_mean": None, "optimized_std": None}], tmp_path / "d.png"))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic saves leave no temporary files
