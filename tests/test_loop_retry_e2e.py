"""Seed 004's loop, decisions C and D, through Snakemake on the toy trainer (tests/toy_trainer.py), both
experiments in one workflow:
- toy_c: the diagnosis reads the toy's large updates as a learning rate too high, and the lower one it
  recommends makes the model clearly worse. C re-diagnoses and tries the next strategy (a sweep over the
  recommended knob), which does not help either; no round is left, so the loop reverts to the baseline, saying why.
- toy_d: the only change is a gradient clip far above any gradient (the user's optimize.overrides), which
  leaves training as it was. Two attempts (targeted, then iterative) each move the metric by less than the
  ceiling gain: D, the baseline is at its ceiling."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e_support import TOY, TOY_RESOURCES, snakemake, write_config

pytestmark = pytest.mark.e2e

COMMON = {"trainer": TOY, "resources": TOY_RESOURCES, "baseline": {"optim": {"lr": 0.01}, "train": {"epochs": 8}},
          "significance": {"seeds": 2, "n_boot": 200}, "finalize": {"max_iterations": 1}}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("loop_retry")
    write_config(work / "config.yaml", {
        "toy_c": {**COMMON, "optimize": {"strategy": "targeted", "sweep": {"n_trials": 2}}},
        "toy_d": {**COMMON, "diagnose": {"thresholds": {"update_ratio_high": 1.0}},  # no finding of its own
                  "optimize": {"strategy": "targeted", "overrides": {"train.grad_clip": 1000.0},
                               "iterative": {"max_iterations": 1}}},
    })
    proc = snakemake(work, "--cores", "2", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def _loop(work, exp):
    return json.loads((work / "results" / exp / "loop" / "loop.json").read_text())


def test_c_rediagnoses_tries_the_next_strategy_then_reverts_with_the_reason(workflow):
    first, second = _loop(workflow, "toy_c")["rounds"]
    assert (first["strategy"], first["verdict"]) == ("targeted", "worse")
    assert (first["decision"]["option"], first["decision"]["next"], first["decision"]["next_strategy"]) == ("C", "retry", "sweep")
    # round 2 starts again from the baseline, with its own diagnosis, and sweeps around the recommended lr
    res = workflow / "results" / "toy_c" / "round2"
    diag = json.loads((res / "diagnosis" / "diagnosis.json").read_text())
    assert diag["strategy"]["chosen"] == "sweep" and "round 1 ended in decision C" in diag["strategy"]["reason"]
    assert diag["baseline"]["run_dir"].endswith("toy_c/seeds/baseline/seed0") and second["starts_from"] == {"round": 1, "side": "baseline"}
    space = yaml.safe_load((res / "experiment.yaml").read_text())["optimize"]["sweep"]["space"]
    assert set(space) == {"optim.lr"} and space["optim.lr"]["log"]
    assert len(list((res / "optimize" / "sweep" / "trials").glob("trial*/trial.json"))) == 2
    assert second["verdict"] != "improved" and second["decision"]["option"] == "C"
    assert second["decision"]["next"] == "revert" and "no rounds are left (finalize.max_iterations)" in second["decision"]["rationale"]
    final = _loop(workflow, "toy_c")["final"]
    assert (final["chosen_side"], final["config_round"], final["verified_by"]) == ("baseline", 1, None)
    text = (workflow / "reports" / "toy_c" / "optimization_results.md").read_text()
    assert "**Decision: Option C" in text
    # round 2 started from the baseline again: the decision names the config it keeps by its round
    assert "revert to the config round 2 started from (the baseline config of round 1)" in text
    assert json.loads((workflow / "results" / "toy_c" / "final" / "final.json").read_text())["chosen_side"] == "baseline"


def test_d_stops_after_the_recorded_attempts(workflow):
    loop = _loop(workflow, "toy_d")
    first, second = loop["rounds"]
    assert (first["decision"]["option"], first["decision"]["next_strategy"]) == ("C", "iterative")  # no space to sweep
    assert second["strategy"] == "iterative"
    assert second["decision"]["option"] == "D" and second["decision"]["next"] == "accept_ceiling"
    assert "2 optimization attempts gained +0.00%, +0.00%, each under 2%" in second["decision"]["rationale"]
    assert loop["final"]["chosen_side"] == "baseline"
    assert not (workflow / "results" / "toy_d" / "round3").exists()
