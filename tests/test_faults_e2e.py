"""Faults through Snakemake, on the toy trainer (tests/toy_trainer.py): a training job that runs out of memory
is retried with half the batch, and the whole workflow killed at several points and run again ends exactly
as a run that was never killed, in its files and in MLflow."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_workflow_e2e import REPO, _env, snakemake

pytestmark = pytest.mark.e2e

TOY = "toy_trainer:ToyTrainer"
RESOURCES = {"threads": 1, "mem_mb": 500, "runtime": 5}


def _mlflow_runs(work: Path, exp: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(exp)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


# --- out of memory -------------------------------------------------------------------------------------------


def test_out_of_memory_is_retried_by_snakemake_with_half_the_batch(tmp_path):
    cfg = {"experiments": {"oom": {"trainer": TOY, "resources": RESOURCES,  # resources.retries: the default, 2
                                   "baseline": {"train": {"epochs": 3, "batch_size": 32, "oom_above_batch": 16}}}}}
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "results/oom/baseline/metrics.json", configfile=tmp_path / "oom.yaml",
                     timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the first attempt failed with the reason in its log (Snakemake shows failed logs), then was retried
    assert "out of memory at train.batch_size=32 (OutOfMemoryError: CUDA out of memory." in out
    assert "retrying with a smaller batch, train.batch_size=16" in out and "Trying to restart job" in out
    assert "mem_mb=1000" in out  # the retry also gets twice the memory

    run_dir = tmp_path / "results" / "oom" / "baseline"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["attempt"] == 2
    assert info["batch_size"] == {"key": "train.batch_size", "configured": 32, "used": 16}
    assert [(e["status"], e["batch_size"]["used"]) for e in info["earlier"]] == [("failed", 32)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 16
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "done"
    assert "train.batch_size=16 instead of 32" in (tmp_path / "results" / "oom" / "logs" / "train_baseline.log").read_text()

    # MLflow: the attempt that ran out of memory is a failed run saying why; the retry the run that counts
    _, runs = _mlflow_runs(tmp_path, "oom")
    runs = [r for r in runs if r.data.tags.get("phase") == "baseline"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(failed) == 1 and len(done) == 1 and len(runs) == 2
    assert failed[0].data.tags["status"] == "failed" and "out of memory" in failed[0].data.tags["reason"]
    assert done[0].info.run_id == info["mlflow_run_id"] and done[0].data.params["train.batch_size"] == "16"
    assert done[0].data.tags["retry_of"] == failed[0].info.run_id


# --- killed anywhere, run again ------------------------------------------------------------------------------

EXP = "toy_kill"
TARGET = f"results/{EXP}/final/final.json"
# metrics that measure the clock, not the model
TIMING = ("seconds", "samples_per_s", "data_frac")


def _experiment() -> dict:
    # sleep sets the pace (6 epochs of ~0.25 s per run), so a kill can land while a run is training
    return {"trainer": TOY, "resources": RESOURCES,
            "baseline": {"train": {"epochs": 6, "sleep": 0.04}},
            "optimize": {"strategy": "sweep", "sweep": {
                "n_trials": 2, "sampler": "grid", "pruner": "none", "base": "baseline",
                "space": {"optim.lr": {"type": "categorical", "choices": [0.005, 0.02]}}}},
            "significance": {"seeds": 2, "n_boot": 200}}


def _training(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "metrics.json").exists()


def _results(work: Path) -> Path:
    return work / "results" / EXP


# (what is running when the workflow is killed, the signal, the condition on the results directory), one of
# each kind of job: a training run (with --cores 2 the baseline side's seed 1 trains beside the baseline), the
# sweep's trials, and the jobs that log once at their end (significance, gate, finalize). SIGKILL is a lost
# node or the OOM killer (nothing runs after it); SIGTERM is `scancel` or a shutdown.
KILLS = [
    ("the baseline training", signal.SIGKILL, lambda res: _training(res / "baseline")),
    ("a sweep trial training", signal.SIGTERM,
     lambda res: any(_training(d) for d in (res / "optimize" / "sweep" / "trials").glob("trial[0-9]*"))),
    ("the jobs after the significance test", signal.SIGKILL,
     lambda res: (res / "significance" / "significance.json").exists()),
]


def _files(work: Path) -> set[str]:
    """Result and report files, without what only a killed attempt leaves: a killed sweep trial's files set
    aside under trials/interrupted, lock files, and the temporary file of a write the kill cut short."""
    out = set()
    for root in ("results", "reports"):
        for path in (work / root).rglob("*"):
            rel = path.relative_to(work).as_posix()
            if path.is_dir() or "/trials/interrupted/" in rel or path.name.endswith((".lock", ".tmp")):
                continue
            out.add(rel)
    return out


def _mlflow_results(work: Path) -> dict:
    """Every MLflow run that is a result, by (name, phase, run directory), with its metric histories; fails on
    a run left RUNNING, a result present twice or a metric step logged twice. Runs of killed attempts that
    were not continued are kept, ended KILLED and tagged status=interrupted: they are not results."""
    client, runs = _mlflow_runs(work, EXP)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "runs left RUNNING"
    out = {}
    for r in runs:
        if r.data.tags.get("status") == "interrupted":
            assert r.info.status == "KILLED", (r.info.run_name, r.info.status)
            continue
        key = (r.info.run_name, r.data.tags.get("phase"), r.data.tags.get("run_dir"))
        if "slot" in r.data.tags:  # which slot trains which point depends on the order the jobs ask in
            key = ("trial", r.data.tags["phase"], r.data.tags["config_hash"])
        assert key not in out, f"MLflow run {key} is there twice"
        histories = {}
        for name in r.data.metrics:
            points = client.get_metric_history(r.info.run_id, name)
            steps = [m.step for m in points]
            assert len(steps) == len(set(steps)), f"{key}: {name} logged twice at a step: {sorted(steps)}"
            histories[name] = {m.step: m.value for m in points}
        out[key] = (r.info.status, histories)
    return out


def _numbers(work: Path) -> dict:
    """What the reports print, from the files the workflow wrote: final metrics of every run, the sweep by slot,
    the significance test, the decision and the test metrics of the final model."""
    res = _results(work)

    def load(path):
        return json.loads(path.read_text())

    runs = {}
    for info in res.rglob("run.json"):
        if "interrupted" in info.parts:
            continue
        metrics = load(info.parent / "metrics.json")
        key = info.parent.relative_to(res).as_posix()
        if info.parent.parent.name == "trials":  # by point: which slot trains which depends on the job order
            key = "trial " + json.dumps(load(info.parent / "trial.json")["params"], sort_keys=True)
        runs[key] = {
            "primary": metrics["primary"], "best_step": metrics["best_step"], "status": metrics["status"],
            "best": {k: v for k, v in (metrics.get("best") or {}).items() if not k.endswith(TIMING)}}
    sweep = load(res / "optimize" / "sweep" / "sweep.json")
    return {
        "runs": runs,
        "sweep": sorted((t["state"], t["value"], json.dumps(t["params"], sort_keys=True)) for t in sweep["trials"]),
        "best": {k: load(res / "optimize" / "sweep" / "best.json")[k] for k in ("value", "params")},
        "significance": load(res / "significance" / "significance.json"),
        "decision": load(res / "significance" / "decision.json"),
        "final": {k: load(res / "final" / "final.json")[k] for k in ("chosen_side", "decision", "val", "test")},
    }


def _same_metrics(reference: dict, again: dict) -> None:
    assert set(again) == set(reference), set(again) ^ set(reference)
    for key, (status, histories) in reference.items():
        status_again, histories_again = again[key]
        assert status_again == status, key
        for name, points in histories.items():
            assert set(histories_again[name]) == set(points), (key, name)
            if not name.endswith(TIMING) and "seconds" not in name:
                for step, value in points.items():
                    assert math.isclose(histories_again[name][step], value, rel_tol=1e-9, abs_tol=1e-12), (key, name, step)


def test_killed_anywhere_and_run_again_ends_as_if_never_killed(tmp_path):
    cfg = {"experiments": {EXP: _experiment()}}
    reference, work = tmp_path / "reference", tmp_path / "killed"
    for d in (reference, work):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(reference, "--cores", "2", TARGET, configfile=reference / "config.yaml", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # --nolock: a Snakemake killed hard leaves its lock behind, which a user clears with `snakemake --unlock`
    # (another start of the workflow, parsing it for nothing here: nothing else runs in this directory)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--workflow-profile", str(REPO / "profiles" / "default"), "--configfile", str(work / "config.yaml"),
           "--cores", "2", "--nolock", TARGET]
    for what, sig, ready in KILLS:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and not ready(_results(work)):
            time.sleep(0.1)
        assert proc.poll() is None, f"the workflow ended before {what} could be killed (rc {proc.returncode})"
        os.killpg(proc.pid, sig)  # the whole process group: Snakemake and the jobs it started
        proc.wait(timeout=120)
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    # the kills hit what they aimed at: the baseline resumed after a hard kill, the killed sweep trial(s)
    # were set aside, their MLflow runs ended as interrupted, and their points trained again
    res = _results(work)
    assert [e["status"] for e in json.loads((res / "baseline" / "run.json").read_text())["earlier"]] == ["killed"]
    aside = list((res / "optimize" / "sweep" / "trials" / "interrupted").iterdir())
    _, runs = _mlflow_runs(work, EXP)
    assert aside and len(aside) == sum(r.data.tags.get("status") == "interrupted" and "slot" in r.data.tags for r in runs)

    assert _files(work) == _files(reference), _files(work) ^ _files(reference)
    assert _numbers(work) == _numbers(reference)
    _same_metrics(_mlflow_results(reference), _mlflow_results(work))
