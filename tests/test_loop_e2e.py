"""Seed 004's loop, decision B, through Snakemake on the toy trainer (tests/toy_trainer.py): a learning rate this
low leaves round 1's optimized run still improving at its end, so B goes on from the optimized config for a
second round and stops there at finalize.max_iterations. The workflow is killed (SIGKILL: a lost node) while
round 2 trains, and the next start finishes the loop as if it had never been killed: the same rounds, one
MLflow run per run folder, nothing left running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import yaml

from e2e_support import TOY, TOY_RESOURCES, ctrl_c_reaches, env, mlflow_runs, snakemake, snakemake_cmd, write_config

pytestmark = pytest.mark.e2e

EXP = "toy_loop"


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("loop")
    write_config(work / "config.yaml", {EXP: {
        "trainer": TOY, "resources": TOY_RESOURCES,
        # lr_too_low: round 1 raises the lr and the optimized run is still improving; sleep paces the runs so
        # that the kill lands while round 2 trains
        "baseline": {"optim": {"lr": 0.0005}, "train": {"epochs": 6, "sleep": 0.03}},
        "optimize": {"strategy": "targeted"},
        "significance": {"seeds": 2, "n_boot": 200},
        "finalize": {"max_iterations": 1},
    }})
    cmd = snakemake_cmd(work, "--cores", "2", configfile=work / "config.yaml")
    round2 = work / "results" / EXP / "round2" / "optimize" / "targeted"
    log = work / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True,
                                preexec_fn=ctrl_c_reaches)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not (
            (round2 / "checkpoints" / "last.pt").exists() and not (round2 / "metrics.json").exists()):
        time.sleep(0.05)
    assert proc.poll() is None, f"the workflow ended before round 2 trained (rc {proc.returncode})\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (work / "results" / EXP / "loop" / "loop.json").exists()
    # a Snakemake killed hard leaves its lock behind, which a user clears with `snakemake --unlock` (README)
    assert snakemake(work, "--unlock", configfile=work / "config.yaml").returncode == 0
    again = snakemake(work, "--cores", "2", configfile=work / "config.yaml")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return work


def test_b_goes_on_from_the_optimized_config_and_stops_at_max_iterations(workflow):
    res = workflow / "results" / EXP
    loop = json.loads((res / "loop" / "loop.json").read_text())
    first, second = loop["rounds"]
    assert (first["decision"]["option"], first["decision"]["next"]) == ("B", "iterate")
    assert first["verdict"] == "improved"
    # round 2 starts from round 1's optimized config, diagnoses its run and compares with its seeds
    assert second["starts_from"] == {"round": 1, "side": "optimized"}
    round2_exp = yaml.safe_load((res / "round2" / "experiment.yaml").read_text())
    seed0 = yaml.safe_load((res / "seeds" / "optimized" / "seed0" / "config.yaml").read_text())
    assert round2_exp["baseline"] == seed0 and round2_exp["round"]["index"] == 2
    diag2 = json.loads((res / "round2" / "diagnosis" / "diagnosis.json").read_text())
    assert diag2["baseline"]["run_dir"].endswith(f"{EXP}/seeds/optimized/seed0")
    sig2 = json.loads((res / "round2" / "significance" / "significance.json").read_text())
    assert sig2["baseline"]["values"] == json.loads((res / "significance" / "significance.json").read_text())["optimized"]["values"]
    # ... and the loop ends there: no round is left
    assert second["decision"]["next"] in ("finalize", "accept_ceiling")
    if second["decision"]["option"] == "B":
        assert "no rounds are left (finalize.max_iterations)" in second["decision"]["rationale"]
    assert not (res / "round3").exists()
    # the final model is the best verified round's
    final = json.loads((res / "final" / "final.json").read_text())
    kept = loop["final"]
    assert final["config_round"] == kept["config_round"]
    if second["verdict"] == "improved":
        assert (kept["config_round"], kept["config_side"]) == (2, "optimized")
        assert kept["verified_by"]["round"] == 2
    final_cfg = yaml.safe_load((res / "final" / "final_config.yaml").read_text())
    assert final_cfg == yaml.safe_load((workflow / kept["config_path"]).read_text())


def test_the_reports_show_the_rounds_and_decision_a_criteria_with_values(workflow):
    reports = workflow / "reports" / EXP
    text = (reports / "optimization_results.md").read_text()
    assert "## Rounds" in text and "](plots/rounds.png)" in text and (reports / "plots" / "rounds.png").stat().st_size > 0
    loop = json.loads((workflow / "results" / EXP / "loop" / "loop.json").read_text())
    for r in loop["rounds"]:
        assert f"| [{r['round']}](" in text and f"{r['optimized']['mean']:.4g}" in text
    assert "## Round 1" in text and "## Round 2" in text
    # round 2's own page, its links rebased onto the experiment's folder
    assert "](round2/plots/curves_comparison.png)" in text and (reports / "round2" / "round_results.md").exists()
    for criterion in ("improvement verified", "relative train-val gap", "seed spread (std / mean)", "target met"):
        assert f"| {criterion}" in text
    gap = next(c for c in loop["final"]["criteria"] if c["name"] == "relative train-val gap")
    assert f"| {gap['value']:.4g} | {gap['threshold']:.4g} |" in text


def test_the_killed_round_finished_as_if_never_killed(workflow):
    res = workflow / "results" / EXP
    info = json.loads((res / "round2" / "optimize" / "targeted" / "run.json").read_text())
    assert [e["status"] for e in info.get("earlier", [])] == ["killed"]  # the kill hit round 2's training
    client, runs = mlflow_runs(workflow, EXP)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = Counter(r.data.tags.get("run_dir") for r in runs if r.info.status == "FINISHED" and r.data.tags.get("run_dir"))
    assert finished and max(finished.values()) == 1, finished
    # every round has its own parent run, and round 2's runs say so
    names = Counter(r.info.run_name for r in runs)
    assert names["significance"] == 1 and names["significance-round2"] == 1 and names["loop"] == 1
    # the experiment's files stay on its one `workflow` run, a later round's under round<r>/
    (flow,) = [r for r in runs if r.info.run_name == "workflow"]
    logged = {a.path for a in client.list_artifacts(flow.info.run_id, "round2")}
    assert {"round2/experiment.yaml", "round2/gates"} <= logged
    assert {r.data.tags.get("round") for r in runs if "/round2/" in r.data.tags.get("run_dir", "")} == {"2"}
    proc = snakemake(workflow, "-n", "--cores", "2", configfile=workflow / "config.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]
