"""Strategy `sweep` through Snakemake on the toy trainer (tests/toy_trainer.py): samplers and pruners end to end,
the trials' MLflow runs and a finished sweep with nothing left to do. What these check is the sweep's machinery
(slots, the study, select-best, best.yaml, the seeds of the best config), which no trainer changes; a workflow
killed in the middle of a sweep is a row of test_kills_e2e.py's table of kill points."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e_support import TOY, TOY_RESOURCES, snakemake, write_config
from toy_trainer import ToyTrainer

pytestmark = pytest.mark.e2e

# test_sweep.py runs every sampler and pruner on a real journal study in-process; through Snakemake, CI's time
# budget allows three: the grid (it walks its points by slot), a QMC sequence and TPE, with three pruners
PAIRS = [("grid", "none"), ("qmc", "successive_halving"), ("tpe", "hyperband")]
N_TRIALS = 3


def sweep_experiment(sampler: str, pruner: str, n_trials: int = N_TRIALS, trial_epochs: int = 4) -> dict:
    return {
        "trainer": TOY,
        "baseline": {"train": {"epochs": 4, "batch_size": 32}},
        "optimize": {"strategy": "sweep", "sweep": {
            "n_trials": n_trials, "sampler": sampler, "pruner": pruner, "epochs": trial_epochs, "grid_points": 2,
            # the five kinds of knob a real trainer's default space holds: log-scaled and linear floats, categoricals
            "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                      "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
                      "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
                      "model.hidden": {"type": "categorical", "choices": [16, 32]},
                      "train.batch_size": {"type": "categorical", "choices": [32, 64]}}}},
        "significance": {"seeds": 2, "n_boot": 200},
        "resources": TOY_RESOURCES,
    }


# CI keeps to its time budget: every pair runs through the sweep and select_best; one also runs the
# rest of the workflow (seeds, significance, finalize) on the sweep's best config.
FULL = "sw_tpe_hyperband"


def n_trials(exp: str) -> int:
    return N_TRIALS if exp == FULL else 2


def targets() -> list[str]:
    return [f"results/{FULL}/final/final.json"] + [
        f"results/sw_{s}_{p}/optimize/sweep/best.json" for s, p in PAIRS if f"sw_{s}_{p}" != FULL
    ]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweeps")
    write_config(work / "sweeps.yaml", {f"sw_{s}_{p}": sweep_experiment(s, p, n_trials=n_trials(f"sw_{s}_{p}"))
                                        for s, p in PAIRS})
    proc = snakemake(work, "--cores", "2", *targets(), configfile=work / "sweeps.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


@pytest.mark.parametrize("sampler, pruner", PAIRS)
def test_each_sampler_and_pruner_runs_end_to_end(matrix, sampler, pruner):
    exp = f"sw_{sampler}_{pruner}"
    res = matrix / "results" / exp
    summary = json.loads((res / "optimize" / "sweep" / "sweep.json").read_text())
    assert (summary["sampler"], summary["pruner"]) == (sampler, pruner)
    assert sorted(t["slot"] for t in summary["trials"]) == list(range(n_trials(exp)))
    assert len({t["number"] for t in summary["trials"]}) == n_trials(exp)
    # nothing was killed: no attempt set aside (Snakemake's pre-made empty output folder is not one)
    assert not (res / "optimize" / "sweep" / "trials" / "interrupted").exists()
    assert summary["states"]["COMPLETE"] >= 1
    assert {c["id"] for c in summary["checks"]} >= {"failed_share", "trials_for_spread", "best_step"}
    best = json.loads((res / "optimize" / "sweep" / "best.json").read_text())
    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert best["value"] == max(t["value"] for t in complete)
    # best.yaml is the base config with the best trial's values
    best_cfg = yaml.safe_load((res / "optimize" / "sweep" / "best.yaml").read_text())
    assert best_cfg["model"]["hidden"] == best["params"]["model.hidden"]
    assert best_cfg["optim"]["lr"] == pytest.approx(best["params"]["optim.lr"])
    trial_cfg = yaml.safe_load((Path(matrix) / best["run_dir"] / "config.yaml").read_text())
    assert trial_cfg["train"]["epochs"] == 4 and trial_cfg["model"] == best_cfg["model"]
    if exp != FULL:
        return
    # the optimized seeds train exactly best.yaml, and the report carries the sweep
    seed_cfg = yaml.safe_load((res / "seeds" / "optimized" / "seed0" / "config.yaml").read_text())
    assert seed_cfg == best_cfg
    report = (matrix / "reports" / exp / "optimization_results.md").read_text()
    assert "## Sweep" in report and f"Sampler `{sampler}`, pruner `{pruner}`" in report
    assert f"{best['value']:.4g}" in report
    assert (matrix / "results" / exp / "final" / "final.json").exists()


def test_sweep_trials_are_children_of_the_sweep_run_in_mlflow(matrix):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{matrix / 'mlflow.db'}")
    exp = client.get_experiment_by_name(FULL)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parent = [r for r in runs if r.info.run_name == "sweep"]
    trials = [r for r in runs if r.data.tags.get("slot") is not None]
    assert len(parent) == 1 and len(trials) == N_TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    assert "best_value" in parent[0].data.metrics
    for r in trials:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, ToyTrainer.primary_metric)]
        assert steps == list(range(1, len(steps) + 1)) and steps


def test_nothing_to_do_after_a_finished_sweep(matrix):
    cfg = matrix / "sweeps.yaml"
    proc = snakemake(matrix, "-n", "--cores", "2", *targets(), configfile=cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
