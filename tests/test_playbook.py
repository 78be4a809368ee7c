"""Playbook checks after a sweep, the sweep plots and the sweep report section, from hand-built sweep.json dicts."""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from tunewise.phases.playbook import DEFAULT_THRESHOLDS, best_trial, sweep_checks
from tunewise.reports import plots
from tunewise.reports.render import render, write_optimization_results
from tunewise.reports.sweep import sweep_context
from tunewise.runs import write_json

METRIC = "val/r2_mean"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": False},
    "model.hidden": {"type": "categorical", "choices": [128, 256, 512]},
}


def trial(slot: int, value, state: str = "COMPLETE", *, reason=None, best_step=10, epochs_planned=20,
          epochs_run=None, run_dir=None, **params) -> dict:
    defaults = {"optim.lr": 1e-3, "model.dropout": 0.25, "model.hidden": 256}
    return {"slot": slot, "number": slot + 100, "state": state, "value": value,
            "params": {**defaults, **{k.replace("__", "."): v for k, v in params.items()}},
            "run_dir": run_dir or f"results/demo/optimize/sweep/trials/trial{slot}", "best_step": best_step,
            "epochs_run": epochs_run if epochs_run is not None else (epochs_planned if state == "COMPLETE" else 5),
            "epochs_planned": epochs_planned, "reason": reason}


def sweep(trials: list[dict], space: dict | None = None, direction: str = "max", best_slot: int | None = None,
          importance: dict | None = None) -> dict:
    sign = 1 if direction == "max" else -1
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    best = None
    if best_slot is not None:
        best = next(t for t in trials if t["slot"] == best_slot)
    elif done:
        best = max(done, key=lambda t: sign * t["value"])
    return {
        "metric": {"name": METRIC, "direction": direction}, "sampler": "tpe", "pruner": "median",
        "n_trials": len(trials), "space": SPACE if space is None else space, "trials": trials,
        "best": {k: best[k] for k in ("slot", "number", "value", "params", "run_dir")} if best else None,
        "importance": importance or {},
    }


def spread_trials(values: list[float], **kw) -> list[dict]:
    return [trial(i, v, **kw) for i, v in enumerate(values)]


def by_id(checks: list[dict]) -> dict[str, dict]:
    return {c["id"]: c for c in checks}


# --- boundary ------------------------------------------------------------------------------------------


def test_boundary_fires_near_the_high_end_of_a_linear_range():
    trials = spread_trials([0.5, 0.55, 0.6, 0.62, 0.58, 0.51]) + [trial(6, 0.81, model__dropout=0.48)]
    check = by_id(sweep_checks(sweep(trials)))["boundary:model.dropout"]
    assert check["ok"] is False
    assert check["evidence"]["position"] == pytest.approx(0.96)
    assert check["evidence"]["best"] == 0.48 and check["evidence"]["margin"] == 0.1
    assert check["action"] == "widen the range of model.dropout towards high"
    assert "96.0%" in check["summary"]


def test_boundary_is_measured_in_log_space_for_log_parameters():
    near_low = sweep(spread_trials([0.5, 0.6]) + [trial(2, 0.9, optim__lr=1.4e-4)])
    check = by_id(sweep_checks(near_low))["boundary:optim.lr"]
    assert check["ok"] is False
    assert check["evidence"]["position"] == pytest.approx(math.log(1.4) / math.log(100))
    assert check["action"] == "widen the range of optim.lr towards low"
    # 5e-4 is 4% of the linear range but 35% of the log range: not near a boundary
    inside = sweep(spread_trials([0.5, 0.6]) + [trial(2, 0.9, optim__lr=5e-4)])
    check = by_id(sweep_checks(inside))["boundary:optim.lr"]
    assert check["ok"] is True and check["action"] is None
    assert check["evidence"]["position"] == pytest.approx(math.log(5) / math.log(100))


def test_boundary_of_an_ordered_numeric_categorical_and_none_for_unordered():
    space = {**SPACE, "optim.name": {"type": "categorical", "choices": ["adam", "sgd"]}}
    at_end = sweep([trial(0, 0.5), trial(1, 0.7, model__hidden=512, optim__name="sgd")], space=space)
    checks = by_id(sweep_checks(at_end))
    assert checks["boundary:model.hidden"]["ok"] is False
    assert checks["boundary:model.hidden"]["evidence"]["index"] == 2
    assert checks["boundary:model.hidden"]["action"] == "widen the range of model.hidden towards high"
    assert checks["boundary:optim.name"]["ok"] is None  # no order, no boundary: said, not passed
    middle = sweep([trial(0, 0.5, model__hidden=512), trial(1, 0.7, model__hidden=256)])
    assert by_id(sweep_checks(middle))["boundary:model.hidden"]["ok"] is True
    descending = {**SPACE, "model.hidden": {"type": "categorical", "choices": [512, 256, 128]}}
    low_end = sweep([trial(0, 0.5), trial(1, 0.7, model__hidden=128)], space=descending)
    assert by_id(sweep_checks(low_end))["boundary:model.hidden"]["action"] == "widen the range of model.hidden towards low"


def test_boundary_cannot_be_computed_without_a_complete_trial():
    checks = sweep_checks(sweep([trial(0, None, "FAIL", reason="killed"), trial(1, 0.4, "PRUNED")]))
    assert all(c["ok"] is None for c in checks if c["id"].startswith("boundary:"))
    assert by_id(checks)["best_step"]["ok"] is None


# --- failed / diverged share -------------------------------------------------------------------------


def test_failed_share_counts_fail_state_and_non_finite_reasons():
    trials = spread_trials([0.5, 0.6, 0.55, 0.52, 0.58, 0.61, 0.57])
    trials += [trial(7, None, "FAIL", reason="worker killed"), trial(8, None, "FAIL", reason="OOM"),
               trial(9, 0.1, "COMPLETE", reason="non-finite loss nan at step 3")]
    check = by_id(sweep_checks(sweep(trials)))["failed_share"]
    assert check["ok"] is False
    assert check["evidence"] == {"n_trials": 10, "n_failed": 3, "n_diverged": 1, "n_other_failures": 2,
                                 "threshold": 0.2, "share": pytest.approx(0.3)}
    assert check["action"] == "reparameterise / lower the learning-rate range"
    assert "3 of 10 trials (30%)" in check["summary"]


def test_failed_share_at_the_threshold_passes_and_inf_value_counts_as_diverged():
    trials = spread_trials([0.5, 0.6, 0.55, 0.52, 0.58, 0.61, 0.57, 0.59])
    trials += [trial(8, None, "FAIL", reason="killed"), trial(9, "inf", "COMPLETE")]
    check = by_id(sweep_checks(sweep(trials, best_slot=5)))["failed_share"]
    assert check["evidence"]["share"] == pytest.approx(0.2) and check["evidence"]["n_diverged"] == 1
    assert check["ok"] is True
    assert by_id(sweep_checks(sweep(trials, best_slot=5), {"max_failed_share": 0.1}))["failed_share"]["ok"] is False


# --- trials too few for the spread ---------------------------------------------------------------------


def robust_z(values: list[float], sign: int = 1) -> float:
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    best = max(values, key=lambda v: sign * v)
    return sign * (best - median) / (1.4826 * mad)


def test_too_few_complete_trials_per_parameter_fires():
    check = by_id(sweep_checks(sweep(spread_trials([0.1, 0.2, 0.3, 0.4, 0.95]))))["trials_for_spread"]
    assert check["ok"] is False
    assert check["evidence"]["n_complete"] == 5 and check["evidence"]["n_params"] == 3
    assert check["evidence"]["min_complete"] == 6  # 2 per parameter
    assert "run more trials (at least 6" in check["action"]


def test_best_standing_out_passes_and_best_within_the_spread_fires():
    clear = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.95]
    check = by_id(sweep_checks(sweep(spread_trials(clear))))["trials_for_spread"]
    assert check["evidence"]["best_z"] == pytest.approx(robust_z(clear)) == pytest.approx(1.6863, abs=1e-3)
    assert check["evidence"]["median"] == pytest.approx(0.45) and check["evidence"]["best"] == 0.95
    assert check["evidence"]["std"] == pytest.approx(statistics.stdev(clear))
    assert check["ok"] is True

    crowded = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.61, 0.62]  # the best is 0.74 robust std above the median
    check = by_id(sweep_checks(sweep(spread_trials(crowded))))["trials_for_spread"]
    assert check["evidence"]["best_z"] == pytest.approx(robust_z(crowded)) == pytest.approx(0.7397, abs=1e-3)
    assert check["ok"] is False and "0.74 robust standard deviations" in check["summary"]

    # a loss (direction min): the same spread mirrored gives the same number
    mirrored = sweep(spread_trials([-v for v in clear]), direction="min")
    check = by_id(sweep_checks(mirrored))["trials_for_spread"]
    assert check["evidence"]["best_z"] == pytest.approx(robust_z(clear)) and check["ok"] is True


def test_spread_that_cannot_be_measured_is_none_not_a_pass():
    check = by_id(sweep_checks(sweep(spread_trials([0.5] * 8))))["trials_for_spread"]
    assert check["ok"] is None and "best_z" not in check["evidence"]


# --- best step and pruned share ------------------------------------------------------------------------


@pytest.mark.parametrize("best_step, ok, action", [
    (2, False, "fewer epochs"), (17, False, "train longer"), (10, True, None), (15, True, None), (16, False, "train longer"),
])
def test_best_step_early_or_late_in_the_best_trial(best_step, ok, action):
    trials = spread_trials([0.5, 0.6]) + [trial(2, 0.9, best_step=best_step, epochs_planned=20)]
    check = by_id(sweep_checks(sweep(trials)))["best_step"]
    assert check["ok"] is ok
    assert check["evidence"]["best_step"] == best_step and check["evidence"]["epochs_planned"] == 20
    assert check["evidence"]["fraction"] == pytest.approx(best_step / 20)
    assert check["evidence"]["slot"] == 2
    assert (check["action"] or "").startswith(action) if action else check["action"] is None


def test_best_step_unknown_without_planned_epochs():
    trials = spread_trials([0.5, 0.6]) + [trial(2, 0.9, epochs_planned=None)]
    assert by_id(sweep_checks(sweep(trials)))["best_step"]["ok"] is None


def test_pruned_share_is_reported_as_a_number():
    trials = spread_trials([0.5, 0.6, 0.7, 0.8, 0.55]) + [trial(5 + i, 0.3, "PRUNED") for i in range(3)]
    check = by_id(sweep_checks(sweep(trials)))["pruned_share"]
    assert check["severity"] == "info" and check["ok"] is True
    assert check["evidence"]["n_pruned"] == 3 and check["evidence"]["share"] == pytest.approx(3 / 8)
    assert check["evidence"]["epochs_run"] == 5 * 20 + 3 * 5 and check["evidence"]["epochs_planned"] == 160


def test_empty_sweep_never_passes_and_best_trial_follows_the_file():
    checks = sweep_checks(sweep([]))
    assert checks and not any(c["ok"] is True for c in checks)
    assert by_id(checks)["failed_share"]["ok"] is None and by_id(checks)["pruned_share"]["ok"] is None
    # the file's best (say, the lead picked by slot) wins over re-ranking
    s = sweep(spread_trials([0.5, 0.9]), best_slot=0)
    assert best_trial(s)["slot"] == 0
    assert set(DEFAULT_THRESHOLDS) >= {"boundary_frac", "max_failed_share", "min_best_z", "early_frac", "late_frac"}


# --- plots and the report section -----------------------------------------------------------------------


def _with_histories(tmp_path: Path) -> dict:
    trials = []
    values = [0.61, 0.72, 0.55, 0.81, 0.4]
    for slot, value in enumerate(values):
        run_dir = tmp_path / "trials" / f"trial{slot}"
        run_dir.mkdir(parents=True)
        steps = range(1, 9)
        pd.DataFrame({"step": list(steps), METRIC: [value * s / 8 for s in steps],
                      "train/loss": [1 / s for s in steps]}).to_csv(run_dir / "history.csv", index=False)
        trials.append(trial(slot, value, run_dir=str(run_dir), best_step=8, epochs_planned=8,
                            optim__lr=10 ** (-4 + slot / 2), model__dropout=0.1 * slot,
                            model__hidden=[128, 256, 512][slot % 3]))
    trials += [trial(5, 0.2, "PRUNED", optim__lr=2e-3), trial(6, None, "FAIL", reason="non-finite loss nan at step 2",
                                                             optim__lr=9e-3)]
    return sweep(trials, importance={"optim.lr": 0.6132, "model.dropout": 0.2871, "model.hidden": 0.0997})


def _assert_png(path: Path) -> bytes:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 3000, path
    return data


def test_sweep_plots_are_written(tmp_path):
    s = _with_histories(tmp_path)
    out = tmp_path / "plots"
    for draw, name in ((plots.plot_param_axes, "axes.png"), (plots.plot_isolation, "iso.png"),
                       (plots.plot_importance, "imp.png")):
        assert draw(s, out / name) == out / name
        _assert_png(out / name)
    with_curves = _assert_png(plots.plot_top_trial_curves(s, out / "top.png", k=3))
    missing = {**s, "trials": [{**t, "run_dir": str(tmp_path / "nowhere")} for t in s["trials"]]}
    without = _assert_png(plots.plot_top_trial_curves(missing, out / "top_missing.png", k=3))
    assert with_curves != without  # the curves come from the trials' history.csv
    empty = _assert_png(plots.plot_importance({**s, "importance": {}}, out / "imp_empty.png"))
    assert empty != (out / "imp.png").read_bytes()


def test_sweep_section_renders_the_file_numbers(tmp_path):
    s = _with_histories(tmp_path)
    sweep_json = tmp_path / "results" / "sweep.json"
    write_json(sweep_json, {**s, "checks": sweep_checks(s)})  # as select-best writes it
    report = tmp_path / "reports" / "optimization_results.md"
    ctx = sweep_context(sweep_json, report, tmp_path / "reports" / "plots")
    assert [row["slot"] for row in ctx["trials"]] == [3, 1, 0, 2, 4, 5, 6]  # best first, pruned, failed last
    assert ctx["counts"]["COMPLETE"] == 5 and ctx["counts"]["PRUNED"] == 1 and ctx["counts"]["FAIL"] == 1
    assert set(ctx["plots"]) == {"param_axes", "isolation", "top_curves", "importance"}
    for path in ctx["written"]:
        _assert_png(path)
    assert all(not link.startswith("/") and (report.parent / link).exists() for link in ctx["plots"].values())

    text = render("_sweep.md.j2", sweep=ctx)
    assert "**Best trial: slot 3** (Optuna trial 103)" in text and "0.81" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(rows) == 7 and rows[0].startswith("| 1 | 3 (best) | 103 | COMPLETE | 0.81 |")
    assert "| 7 | 6 | 106 | FAIL | n/a |" in rows[-1] and "non-finite loss nan at step 2" in rows[-1]
    assert "`failed_share` | pass (high)" in text  # 1 of 7 = 14%
    assert "n_trials: 7, n_failed: 1" in text
    assert "`pruned_share` | noted (info)" in text and "share: 0.1429" in text
    assert "| `optim.lr` | float | [0.0001, 0.01] | yes |" in text
    assert "| `model.hidden` | categorical | [128, 256, 512] | no |" in text
    assert "best value 0.003162 sits at 75.0% of the log range" in text
    assert "`optim.lr` 0.6132" in text
    for link in ctx["plots"].values():
        assert f"]({link})" in text


def test_optimization_results_includes_the_sweep_section_only_when_given(tmp_path):
    s = _with_histories(tmp_path)
    exp = tmp_path / "results" / "demo"
    write_json(exp / "optimize" / "sweep" / "sweep.json", {**s, "checks": sweep_checks(s)})
    write_json(exp / "diagnosis" / "diagnosis.json", {
        "experiment": "demo", "trainer": "latent", "metric": {"name": METRIC, "direction": "max"},
        "strategy": {"requested": "sweep", "chosen": "sweep", "reason": "requested"}})
    write_json(exp / "significance" / "significance.json", {
        "metric": {"name": METRIC, "direction": "max"}, "seeds": [0, 1],
        "baseline": {"n": 2, "mean": 0.6, "std": 0.01, "values": [0.59, 0.61]},
        "optimized": {"n": 2, "mean": 0.8, "std": 0.01, "values": [0.79, 0.81]}, "verdict": "improved"})
    write_json(exp / "significance" / "decision.json", {"option": "A", "label": "target met", "next": "finalize"})
    args = (exp / "significance" / "significance.json", exp / "significance" / "decision.json",
            exp / "diagnosis" / "diagnosis.json", exp / "baseline", Path(s["trials"][3]["run_dir"]))
    reports = tmp_path / "reports" / "demo"
    written = write_optimization_results(*args, reports, sweep_json=exp / "optimize" / "sweep" / "sweep.json")
    text = (reports / "optimization_results.md").read_text()
    assert "## Sweep" in text and "**Best trial: slot 3**" in text
    assert text.index("## Sweep") < text.index("## Multi-seed significance")
    assert reports / "plots" / "sweep_isolation.png" in written
    write_optimization_results(*args, reports)
    assert "## Sweep" not in (reports / "optimization_results.md").read_text()


def test_sweep_section_shows_the_checks_select_best_recorded_and_refuses_a_file_without(tmp_path):
    """The report prints the checks of sweep.json, not a judgement of its own made later (thresholds may differ)."""
    s = _with_histories(tmp_path)
    sweep_json = tmp_path / "results" / "sweep.json"
    recorded = [{**c, "summary": f"recorded: {c['summary']}"} for c in sweep_checks(s)]
    write_json(sweep_json, {**s, "checks": recorded})
    ctx = sweep_context(sweep_json, tmp_path / "reports" / "r.md", tmp_path / "reports" / "plots")
    assert [c["summary"] for c in ctx["checks"]] == [c["summary"] for c in recorded]
    write_json(sweep_json, s)
    with pytest.raises(ValueError, match="no `checks`"):
        sweep_context(sweep_json, tmp_path / "reports" / "r.md", tmp_path / "reports" / "plots")
