"""Strategy `sweep` through Snakemake on the latent trainer: samplers and pruners end to end, and a
workflow killed in the middle of a sweep that finishes the study on the next run without retraining
a finished trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_workflow_e2e import REPO, _env, ctrl_c_reaches, snakemake

pytestmark = pytest.mark.e2e

# test_sweep.py runs every sampler and pruner on a real journal study in-process; through Snakemake, CI's time
# budget allows three: the grid (it walks its points by slot), a QMC sequence and TPE, with three pruners
PAIRS = [("grid", "none"), ("qmc", "successive_halving"), ("tpe", "hyperband")]
N_TRIALS = 3


def sweep_experiment(sampler: str, pruner: str, n_trials: int = N_TRIALS, trial_epochs: int = 4) -> dict:
    return {
        "trainer": "latent",
        "data": {"source": "embedded", "limit": 600, "targets": ["PF_p", "S_p"]},
        "baseline": {"model": {"hidden": 32, "latent_dim": 8, "head_hidden": 8}, "optim": {"lr": 0.0003},
                     "train": {"epochs": 4, "batch_size": 128}},
        "optimize": {"strategy": "sweep", "sweep": {
            "n_trials": n_trials, "sampler": sampler, "pruner": pruner, "epochs": trial_epochs, "grid_points": 2,
            "space": {"model.hidden": {"type": "categorical", "choices": [32, 64]},
                      "train.batch_size": {"type": "categorical", "choices": [128, 256]}}}},
        "significance": {"seeds": 2, "n_boot": 200},
        "design": {"enabled": False},  # the design phase is test_workflow_e2e's and test_latent_design's
        "resources": {"threads": 1, "mem_mb": 1000, "runtime": 10},
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
    cfg = {"experiments": {f"sw_{s}_{p}": sweep_experiment(s, p, n_trials=n_trials(f"sw_{s}_{p}"))
                           for s, p in PAIRS}}
    (work / "sweeps.yaml").write_text(yaml.safe_dump(cfg))
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
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/r2_mean")]
        assert steps == list(range(1, len(steps) + 1)) and steps


def test_nothing_to_do_after_a_finished_sweep(matrix):
    cfg = matrix / "sweeps.yaml"
    proc = snakemake(matrix, "-n", "--cores", "2", *targets(), configfile=cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_killed_during_a_sweep_keeps_finished_trials_and_finishes_the_study(tmp_path):
    import optuna

    exp = "sw_kill"
    cfg = {"experiments": {exp: sweep_experiment("random", "none", n_trials=3, trial_epochs=60)}}
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    trials = tmp_path / "results" / exp / "optimize" / "sweep" / "trials"
    target = f"results/{exp}/optimize/sweep/best.json"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
           "--workflow-profile", str(REPO / "profiles" / "default"), "--configfile", str(path), "--cores", "1", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
                            preexec_fn=ctrl_c_reaches)
    deadline, finished, running = time.time() + 400, [], []
    while time.time() < deadline and not (finished and running):
        time.sleep(0.5)
        finished = sorted(trials.glob("trial*/trial.json"))
        running = [d for d in trials.glob("trial*") if (d / "checkpoints" / "last.pt").exists()
                   and not (d / "trial.json").exists()]
    assert finished and running, "never saw one finished trial and one training"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("snakemake did not stop within 120 s of Ctrl-C")
    kept = {p.parent.name: (json.loads(p.read_text())["number"], p.stat().st_mtime_ns)
            for p in trials.glob("trial*/trial.json")}
    killed_slot = running[0].name

    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name, (number, mtime) in kept.items():  # finished trials are never recomputed
        p = trials / name / "trial.json"
        assert json.loads(p.read_text())["number"] == number and p.stat().st_mtime_ns == mtime
    summary = json.loads((tmp_path / "results" / exp / "optimize" / "sweep" / "sweep.json").read_text())
    assert sorted(t["slot"] for t in summary["trials"]) == [0, 1, 2]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(trials.parent / "study.journal")))
    study = optuna.load_study(study_name=summary["study"], storage=storage)
    slot = int(killed_slot.removeprefix("trial"))
    attempts = [t for t in study.trials if t.user_attrs.get("slot") == slot]
    assert [t.state.name for t in attempts] == ["FAIL", "COMPLETE"]  # recorded as failed, then re-asked
    assert attempts[0].user_attrs.get("fail_kind", "interrupted") == "interrupted"
    assert (trials / "interrupted").is_dir()  # the killed attempt's files are kept aside
