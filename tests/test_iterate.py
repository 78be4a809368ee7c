"""Iterative refinement: rounds of diagnose -> recommend -> train, their stop rules and the summary/report."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from tunewise.config import commented_config, dump_yaml, load_yaml, validate_schema
from tunewise.experiment import resolve_experiment
from tunewise.phases import iterate
from tunewise.phases.iterate import decide_round, run_round, write_summary
from tunewise.phases.recommend import apply_patch
from tunewise.reports.iterative import iterative_context
from tunewise.reports.render import render
from tunewise.runs import RunDir, atomic_write_text, read_json, write_json
from tunewise.trainers.base import NonFiniteLoss
from toy_trainer import ToyTrainer

# lr 0.0002 for 5 epochs is still improving at the end: every round's diagnosis asks for more epochs and a
# higher rate, so the chain has something to do for three rounds
SLOW = {"optim": {"lr": 0.0002}, "train": {"epochs": 5}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Quiet:
    def epoch(self, step, row):
        pass

    def replay(self, rows):
        pass


def _experiment(baseline: dict, **settings) -> dict:
    raw = {"trainer": "toy_trainer:ToyTrainer", "baseline": baseline, "optimize": {"iterative": settings.pop("iterative", {})}}
    raw.update(settings)
    return resolve_experiment(validate_schema({"experiments": {"toy": raw}}), "toy")


def _trainer(exp: dict, poison: dict | None = None):
    """train_fn for run_round, like `tunewise train` without MLflow: a NaN loss ends the run as diverged."""
    calls = []

    def train(config_path, run_dir):
        calls.append(str(config_path))
        run = RunDir(run_dir)
        if run.is_finished():
            return
        config = load_yaml(config_path)
        for key, value in (poison or {}).items():
            config["train"][key] = value
        run.start(config, exp["seed"])
        try:
            metrics = ToyTrainer().run(config, exp["seed"], run, Quiet(), torch.device("cpu"), exp["metric"], progress=False)
        except NonFiniteLoss as e:
            run.finish({"primary": {"best": None, "final": None}, "best_step": 0}, status="diverged", reason=str(e))
            return
        run.finish(metrics)

    train.calls = calls
    return train


def _baseline_and_diagnosis(exp: dict, exp_dir):
    """What the baseline and diagnose jobs leave behind, made with the same engine."""
    atomic_write_text(exp_dir / "baseline.yaml", dump_yaml(exp["baseline"]))
    _trainer(exp)(exp_dir / "baseline.yaml", exp_dir / "baseline")
    findings, patch, changes = iterate.plan(exp, exp_dir / "baseline")
    write_json(exp_dir / "diagnosis" / "diagnosis.json",
               {"baseline": {"run_dir": str(exp_dir / "baseline")}, "findings": findings, "changes": changes, "patch": patch})
    atomic_write_text(exp_dir / "diagnosis" / "optimization_config.yaml",
                      commented_config(apply_patch(exp["baseline"], patch), changes))
    return read_json(exp_dir / "baseline" / "metrics.json")["primary"]["best"]


def _never(config_path, run_dir):
    raise AssertionError(f"a stopped chain must not train ({config_path})")


# --- the chain, end to end with the toy trainer ------------------------------------------------------------


def test_three_rounds_diagnose_recommend_train_and_summarise(tmp_path):
    exp = _experiment(SLOW)
    base_value = _baseline_and_diagnosis(exp, tmp_path)
    train = _trainer(exp)
    records = [run_round(exp, tmp_path, k, train) for k in (1, 2, 3)]

    assert [r["status"] for r in records] == ["trained"] * 3
    assert train.calls[0] == str(tmp_path / "diagnosis" / "optimization_config.yaml")
    lrs = [RunDir(r["run_dir"]).config()["optim"]["lr"] for r in records]
    epochs = [RunDir(r["run_dir"]).config()["train"]["epochs"] for r in records]
    # each round applies its diagnosis to the previous round's config: 5 -> 10 -> 20 -> 40 epochs
    assert epochs == [10, 20, 40] and lrs == pytest.approx([0.0006, 0.0018, 0.0054])
    for k, r in enumerate(records, 1):
        assert read_json(iterate.round_path(tmp_path, k)) == json.loads(json.dumps(r))
        assert r["value"] == read_json(tmp_path / "optimize" / "iterative" / f"round{k}" / "run" / "metrics.json")["primary"]["best"]
        assert r["previous_best"] == (base_value if k == 1 else records[k - 2]["value"])
        assert r["gain"] == pytest.approx(r["value"] - r["previous_best"]) and r["gain"] > 0
        assert r["gain_rel"] == pytest.approx(r["gain"] / abs(r["previous_best"]))
        assert {c["key"] for c in r["changes"]} == {"train.epochs", "optim.lr"}
        assert r["findings"] and all("root_cause" in f for f in r["findings"])
    assert records[1]["source"]["round"] == 1 and records[1]["changes"][0]["old"] in (10, 0.0006)
    assert [r["decision"]["option"] for r in records] == ["B", "B", "B"]
    assert [r["decision"]["continue"] for r in records] == [True, True, False]
    assert "no rounds are left" in records[2]["decision"]["reason"]

    best = write_summary(exp, tmp_path)
    out = tmp_path / "optimize" / "iterative"
    assert best == read_json(out / "best.json")
    assert best["strategy"] == "iterative" and best["round"] == 3 and best["value"] == records[2]["value"]
    assert best["run_dir"] == records[2]["run_dir"] and best["config"] == str(out / "best.yaml")
    assert best["metric"] == {"name": "val/neg_mse", "direction": "max"}
    assert load_yaml(out / "best.yaml") == RunDir(records[2]["run_dir"]).config()
    summary = read_json(out / "iterative.json")
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3] and summary["baseline"]["value"] == base_value

    # the report section quotes iterative.json
    report = tmp_path / "reports" / "optimization_results.md"
    ctx = iterative_context(out / "iterative.json", report)
    assert ctx["written"][0].read_bytes()[:8] == PNG_MAGIC
    text = render("_iterative.md.j2", iterative=ctx)
    for r in records:
        assert f"{r['value']:.4g}" in text and f"{r['gain_rel'] * 100:+.4g}%" in text
    assert "`train.epochs` 20 -> 40" in text and "**Best: round 3**" in text and "| 0 (baseline) |" in text


def test_a_diverged_round_counts_as_worse_and_the_summary_reverts_to_the_baseline(tmp_path):
    exp = _experiment(SLOW, iterative={"max_iterations": 2})
    _baseline_and_diagnosis(exp, tmp_path)
    first = run_round(exp, tmp_path, 1, _trainer(exp, poison={"nan_at_epoch": 2}))
    assert first["status"] == "trained" and first["run_status"] == "diverged"
    assert first["decision"]["option"] == "C" and not first["decision"]["continue"]
    assert "revert to the baseline" in first["decision"]["reason"] and first["best"]["round"] == 0
    second = run_round(exp, tmp_path, 2, _never)
    assert second["status"] == "skipped" and second["stopped_at"] == 1
    assert second["decision"]["reason"].startswith("skipped: chain stopped at round 1 (round 1 diverged")
    best = write_summary(exp, tmp_path)
    assert best["round"] == 0 and best["reverted_to_baseline"] and best["run_dir"] == str(tmp_path / "baseline")
    assert load_yaml(tmp_path / "optimize" / "iterative" / "best.yaml") == exp["baseline"]
    assert best["decision"]["option"] == "C"


def test_target_met_stops_the_chain(tmp_path):
    base = _baseline_and_diagnosis(exp := _experiment(SLOW), tmp_path)
    # the toy's metric is -MSE; any gain over the baseline of a few percent meets this target
    exp["finalize"]["target"] = base * 0.99
    first = run_round(exp, tmp_path, 1, _trainer(exp))
    assert first["value"] >= exp["finalize"]["target"]
    assert first["decision"]["option"] == "A" and first["decision"]["continue"] is False
    assert [run_round(exp, tmp_path, k, _never)["status"] for k in (2, 3)] == ["skipped", "skipped"]
    assert write_summary(exp, tmp_path)["round"] == 1


def test_a_rerun_round_with_another_config_does_not_reuse_the_old_run(tmp_path):
    exp = _experiment(SLOW, iterative={"max_iterations": 1})
    _baseline_and_diagnosis(exp, tmp_path)
    run_dir = iterate.round_dir(tmp_path, 1) / "run"
    stale = RunDir(run_dir)
    stale.start({"something": "else"}, 0)
    stale.finish({"primary": {"best": 1.0}})
    record = run_round(exp, tmp_path, 1, _trainer(exp))
    assert record["value"] != 1.0 and RunDir(run_dir).config() == load_yaml(tmp_path / "diagnosis" / "optimization_config.yaml")


def test_round_outside_max_iterations_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside 1..2"):
        run_round(_experiment(SLOW, iterative={"max_iterations": 2}), tmp_path, 3, _never)


# --- the stop rules on hand-made records ---------------------------------------------------------------------


def _rec(k: int, value, gain_rel=None, status="trained", run_status="done", previous_best=None) -> dict:
    gain = None if gain_rel is None or previous_best is None else gain_rel * abs(previous_best)
    return {"round": k, "status": status, "run_status": run_status, "value": value, "previous_best": previous_best,
            "gain": gain, "gain_rel": gain_rel, "config": f"round{k}.yaml", "run_dir": f"round{k}/run"}


BASE = _rec(0, 0.50)


def _decide(record, prior, direction="max", target=None, ceiling=0.02, max_iterations=3, empty=False):
    return decide_round(record, prior, direction, target, ceiling, max_iterations, next_patch_empty=empty)


def test_target_met_is_direction_aware():
    assert _decide(_rec(1, 0.60, 0.2, previous_best=0.5), [BASE], target=0.6)["option"] == "A"
    assert _decide(_rec(1, 0.59, 0.18, previous_best=0.5), [BASE], target=0.6)["option"] == "B"
    base_loss = _rec(0, 2.0)
    lower = _rec(1, 1.5, 0.25, previous_best=2.0)
    assert _decide(lower, [base_loss], direction="min", target=1.6)["option"] == "A"
    assert _decide(lower, [base_loss], direction="min", target=1.4)["option"] == "B"


def test_worse_than_the_best_so_far_stops_and_reverts_to_it():
    r1 = _rec(1, 0.60, 0.2, previous_best=0.5)
    worse = _rec(2, 0.55, -0.0833, previous_best=0.60)
    d = _decide(worse, [BASE, r1], target=0.9)
    assert d["option"] == "C" and d["continue"] is False and d["next"] == "revert"
    assert "revert to round 1" in d["reason"] and d["label"] == "Worse: revert to round 1"
    # worse than the baseline in round 1: back to the baseline
    d = _decide(_rec(1, 0.45, -0.1, previous_best=0.5), [BASE])
    assert d["option"] == "C" and "revert to the baseline" in d["reason"]


def test_ceiling_needs_two_small_gains_in_a_row():
    small1 = _rec(1, 0.505, 0.01, previous_best=0.5)
    # round 1 alone under the ceiling: no round before it to pair with, so iterate
    assert _decide(small1, [BASE])["option"] == "B" and _decide(small1, [BASE])["continue"]
    small2 = _rec(2, 0.51, 0.0099, previous_best=0.505)
    d = _decide(small2, [BASE, small1])
    assert d["option"] == "D" and d["continue"] is False and d["next"] == "accept_ceiling"
    assert "+1.00%" in d["reason"] and "+0.99%" in d["reason"]
    big1 = _rec(1, 0.6, 0.2, previous_best=0.5)
    small_after_big = _rec(2, 0.605, 0.0083, previous_best=0.6)
    assert _decide(small_after_big, [BASE, big1])["continue"] is True
    # a higher ceiling_gain turns the same pair of gains into a stop
    assert _decide(small_after_big, [BASE, _rec(1, 0.6, 0.04, previous_best=0.577)], ceiling=0.05)["option"] == "D"


def test_last_round_or_nothing_left_to_change_stops_with_the_best_so_far():
    r2 = _rec(2, 0.7, 0.1667, previous_best=0.6)
    prior = [BASE, _rec(1, 0.6, 0.2, previous_best=0.5)]
    assert _decide(r2, prior, max_iterations=2)["continue"] is False
    assert _decide(r2, prior, max_iterations=3)["continue"] is True
    d = _decide(r2, prior, max_iterations=3, empty=True)
    assert d["continue"] is False and "no recommendation" in d["reason"]


def test_gain_is_direction_aware_and_has_no_ratio_over_zero():
    assert iterate.gain(0.6, 0.5, "max") == pytest.approx((0.1, 0.2))
    assert iterate.gain(1.5, 2.0, "min") == pytest.approx((0.5, 0.25))
    assert iterate.gain(-4.0, -5.0, "max") == pytest.approx((1.0, 0.2))
    assert iterate.gain(0.1, 0.0, "max") == (0.1, None)
    d = _decide({**_rec(2, 0.1, None, previous_best=0.0), "gain": 0.1}, [_rec(0, 0.0), _rec(1, 0.0, 0.0, previous_best=0.0)])
    assert d["continue"] and "+0.1 over 0" in d["reason"]


def test_a_diverged_round_is_worse_even_with_a_good_value():
    d = _decide(_rec(1, 0.9, 0.8, run_status="diverged", previous_best=0.5), [BASE], target=0.8)
    assert d["option"] == "C" and "diverged" in d["reason"]


def test_rounds_after_a_stop_are_skipped_without_training(tmp_path):
    exp = _experiment(SLOW, iterative={"max_iterations": 3})
    _baseline_and_diagnosis(exp, tmp_path)
    stop = {**_rec(1, 0.9, 0.5, previous_best=0.5), "changes": [], "findings": [], "stopped_at": 1,
            "decision": {"option": "A", "label": "Performance meets requirements", "continue": False, "next": "finalize",
                         "reason": "round 1 reached 0.9, which meets the target >= 0.8: finalize."},
            "best": {"round": 1, "config": "round1.yaml", "run_dir": "round1/run", "value": 0.9}}
    write_json(iterate.round_path(tmp_path, 1), stop)
    second = run_round(exp, tmp_path, 2, _never)
    third = run_round(exp, tmp_path, 3, _never)
    for r in (second, third):
        assert r["status"] == "skipped" and r["stopped_at"] == 1 and r["decision"]["option"] == "A"
        assert r["decision"]["reason"] == f"skipped: chain stopped at round 1 ({stop['decision']['reason']})"
        assert r["best"] == stop["best"] and r["config"] is None and r["value"] is None
    assert not (iterate.round_dir(tmp_path, 2) / "run").exists()


def test_a_missing_previous_round_is_a_clear_error(tmp_path):
    exp = _experiment(SLOW)
    _baseline_and_diagnosis(exp, tmp_path)
    with pytest.raises(FileNotFoundError, match="round1/round.json is missing"):
        run_round(exp, tmp_path, 2, _never)


# --- through the CLI, as the Snakemake rules call it (MLflow included) -----------------------------------------


def test_cli_rounds_and_summary_log_to_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tunewise.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"tracking": {"uri": uri}, "experiments": {"toy": {
        "trainer": "toy_trainer:ToyTrainer", "baseline": SLOW,
        "optimize": {"strategy": "iterative", "iterative": {"max_iterations": 2}}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    exp_dir = tmp_path / "results" / "toy"
    exp_file = str(exp_dir / "experiment.yaml")
    common = ["--experiment-file", exp_file]
    assert main(["resolve", "--config", str(tmp_path / "config.yaml"), "--experiment", "toy", "--out", exp_file]) == 0
    assert main(["train", *common, "--run-dir", str(exp_dir / "baseline"), "--threads", "1"]) == 0
    assert main(["diagnose", *common, "--run-dir", str(exp_dir / "baseline"), "--out-dir", str(exp_dir / "diagnosis"),
                 "--reports-dir", str(tmp_path / "reports")]) == 0
    for k in (1, 2):
        out = exp_dir / "optimize" / "iterative" / f"round{k}" / "round.json"
        assert main(["iterate", *common, "--round", str(k), "--out", str(out), "--threads", "1", "--rule", "iterate"]) == 0
    # --out must name the file the round writes
    assert main(["iterate", *common, "--round", "1", "--out", str(tmp_path / "elsewhere.json")]) == 2
    assert main(["iterate", *common, "--round", "3"]) == 2  # beyond max_iterations
    best_json = exp_dir / "optimize" / "iterative" / "best.json"
    assert main(["iterate", *common, "--summary", "--out", str(best_json), "--rule", "iterate_summary"]) == 0

    rounds = [read_json(exp_dir / "optimize" / "iterative" / f"round{k}" / "round.json") for k in (1, 2)]
    assert [r["status"] for r in rounds] == ["trained", "trained"]
    best = read_json(best_json)
    assert best["round"] == 2 and best["value"] == rounds[1]["value"] and best["rounds_trained"] == 2
    client = MlflowClient(uri)
    for k, r in enumerate(rounds, 1):
        run = client.get_run(RunDir(r["run_dir"]).info()["mlflow_run_id"])
        assert run.data.tags["phase"] == "optimize" and run.data.tags["iterative.round"] == str(k)
        assert run.data.tags["iterative.decision"] == r["decision"]["option"]
        assert run.data.metrics["iterative/gain_rel"] == pytest.approx(r["gain_rel"])
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "iterative" and parent.data.metrics["best_round"] == 2

    # the optimization results page gains the rounds section when given iterative.json
    from tunewise.reports.render import write_optimization_results

    base_value = read_json(exp_dir / "baseline" / "metrics.json")["primary"]["best"]
    write_json(tmp_path / "sig.json", {"skipped": True, "reason": "test", "metric": best["metric"],
                                       "baseline": {"n": 1, "mean": base_value, "std": 0.0, "values": [base_value]}})
    write_json(tmp_path / "decision.json", {"option": "B", "label": "x", "next": "finalize", "chosen_side": "optimized",
                                            "target": None, "target_met": None, "rationale": "r"})
    written = write_optimization_results(tmp_path / "sig.json", tmp_path / "decision.json",
                                         exp_dir / "diagnosis" / "diagnosis.json", exp_dir / "baseline",
                                         rounds[1]["run_dir"], tmp_path / "reports",
                                         iterative_json=exp_dir / "optimize" / "iterative" / "iterative.json")
    text = (tmp_path / "reports" / "optimization_results.md").read_text()
    assert "## Iterative refinement" in text and "(plots/iterative_rounds.png)" in text
    assert f"| {rounds[1]['value']:.4g} |" in text and tmp_path / "reports" / "plots" / "iterative_rounds.png" in written
