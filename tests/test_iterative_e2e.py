"""Strategy `iterative` as `auto` chooses it (the diagnosis changes the DAG after the diagnose checkpoint),
through Snakemake on the toy trainer (tests/toy_trainer.py): the rounds' machinery
(diagnose -> patch -> train, best.json, the seeds of best.yaml, the report) is the same for every trainer."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e_support import TOY, TOY_RESOURCES, snakemake, write_config

pytestmark = pytest.mark.e2e


def experiment(**changes) -> dict:
    exp = {
        "trainer": TOY,
        # a learning rate this low is still improving at the end: the diagnosis has one root cause (lr_too_low),
        # and every round something to change (test_iterate.py's SLOW)
        "baseline": {"optim": {"lr": 0.0005}, "train": {"epochs": 6}},
        "significance": {"seeds": 2, "n_boot": 200},
        "resources": TOY_RESOURCES,
    }
    exp.update(changes)
    return exp


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("iterative")
    # (the strategy requested outright runs in test_loop_retry_e2e, as the rung C climbs to after targeted)
    write_config(work / "config.yaml", {
        # a baseline whose only finding is "still improving at the end" with a target far above it (the toy's
        # metric is -MSE; its noise keeps the MSE above 0.01): auto should choose iterative
        "it_auto": experiment(baseline={"optim": {"lr": 0.0002}, "train": {"epochs": 5}},
                              optimize={"strategy": "auto", "iterative": {"max_iterations": 2}},
                              finalize={"target": -0.001}),
    })
    proc = snakemake(work, "--cores", "2", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


@pytest.mark.parametrize("exp", ["it_auto"])
def test_iterative_runs_end_to_end(workflow, exp):
    res = workflow / "results" / exp
    diag = json.loads((res / "diagnosis" / "diagnosis.json").read_text())
    assert diag["strategy"]["chosen"] == "iterative", diag["strategy"]
    if exp == "it_auto":
        assert diag["strategy"]["requested"] == "auto" and "short of the target" in diag["strategy"]["reason"]
    rounds = [json.loads((res / "optimize" / "iterative" / f"round{k}" / "round.json").read_text()) for k in (1, 2)]
    assert rounds[0]["status"] == "trained"
    summary = json.loads((res / "optimize" / "iterative" / "iterative.json").read_text())
    best = json.loads((res / "optimize" / "iterative" / "best.json").read_text())
    assert best["strategy"] == "iterative"
    trained = [r for r in rounds if r["status"] == "trained"]
    if not best.get("reverted_to_baseline"):
        assert best["value"] == max(r["value"] for r in trained if r["value"] is not None)
    # the optimized seeds train best.yaml, and the report shows each round with its metric
    best_cfg = yaml.safe_load((res / "optimize" / "iterative" / "best.yaml").read_text())
    seed_cfg = yaml.safe_load((res / "seeds" / "optimized" / "seed0" / "config.yaml").read_text())
    assert seed_cfg == best_cfg
    report = (workflow / "reports" / exp / "optimization_results.md").read_text()
    for r in trained:
        assert f"{r['value']:.4g}" in report
    assert len(summary["rounds"]) == 2
    assert (res / "final" / "final.json").exists()


def test_nothing_to_do_after_iterative_and_auto(workflow):
    proc = snakemake(workflow, "-n", "--cores", "2", configfile=workflow / "config.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
