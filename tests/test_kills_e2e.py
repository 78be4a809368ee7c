"""The workflow killed at several points and run again, through Snakemake on the toy trainer (tests/toy_trainer.py):
one table of kill points, hit one after another in one work directory, and one reference run never killed.

Each kill is a user's or a machine's: Ctrl-C (SIGINT to the terminal's process group), `scancel` or a shutdown
(SIGTERM), a lost node or the OOM killer (SIGKILL, nothing runs after it). After each, the workflow stops
within two minutes; the next start goes on from where it was, and the last one ends exactly as the reference
did, in its files and in MLflow. Each row's own checks (what its kill hit, and how that was recovered) are a
test of their own, on the same runs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import pytest
import torch

from e2e_support import TOY, TOY_RESOURCES, ctrl_c_reaches, env, mlflow_runs, snakemake, snakemake_cmd, write_config
from toy_trainer import ToyTrainer

pytestmark = pytest.mark.e2e

EXP = "toy_kill"
TARGET = f"results/{EXP}/final/final.json"
EPOCHS = 20
N_TRIALS = 3
# metrics that measure the clock, not the model
TIMING = ("seconds", "samples_per_s", "data_frac")


def _experiment() -> dict:
    # sleep sets the pace (20 epochs of ~0.3 s per run), so a kill lands while a run is training and a resumed
    # run has epochs left to be killed in again
    return {"trainer": TOY, "resources": TOY_RESOURCES,
            "baseline": {"train": {"epochs": EPOCHS, "sleep": 0.04}},
            "optimize": {"strategy": "sweep", "sweep": {
                "n_trials": N_TRIALS, "sampler": "grid", "pruner": "none", "base": "baseline",
                "space": {"optim.lr": {"type": "categorical", "choices": [0.005, 0.01, 0.02]}}}},
            "significance": {"seeds": 2, "n_boot": 200}}


def _results(work: Path) -> Path:
    return work / "results" / EXP


def _trials(work: Path) -> Path:
    return _results(work) / "optimize" / "sweep" / "trials"


def _epoch(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    except Exception:  # not there yet, or being replaced right now
        return 0


def _training(run_dir: Path, since: float) -> bool:
    """This start of the workflow trained the run at least one epoch, and the run has not finished."""
    last = run_dir / "checkpoints" / "last.pt"
    return last.exists() and last.stat().st_mtime > since and not (run_dir / "metrics.json").exists()


def _trial_dirs(work: Path) -> list[Path]:
    return sorted(_trials(work).glob("trial[0-9]*"))


# --- the table -----------------------------------------------------------------------------------------------


@dataclass
class Kill:
    name: str
    sig: signal.Signals
    # (work directory, time this start began) -> the moment to kill has come
    ready: Callable[[Path, float], bool]
    hits: str = ""  # "baseline" or "trial": what the kill interrupts, for the checks after the last run
    finished_trial: bool = False  # a sweep trial had finished when the kill came
    seen: dict = field(default_factory=dict)  # filled in by the `killed` fixture once the workflow stopped


def _baseline_ctrl_c(work: Path, since: float) -> bool:
    # the baseline three epochs in (the Ctrl-C a user gives a run they watch)
    return _epoch(_results(work) / "baseline") >= 3 and not (_results(work) / "baseline" / "metrics.json").exists()


KILLS = [
    Kill("ctrl-c during the baseline", signal.SIGINT, _baseline_ctrl_c, hits="baseline"),
    # with --cores 2 the baseline side's seed 1 trains beside the resumed baseline
    Kill("sigkill during the resumed baseline", signal.SIGKILL,
         lambda work, since: _training(_results(work) / "baseline", since), hits="baseline"),
    Kill("ctrl-c during a sweep trial, another one finished", signal.SIGINT,
         lambda work, since: any((d / "trial.json").exists() for d in _trial_dirs(work))
         and any(_training(d, since) for d in _trial_dirs(work)), hits="trial", finished_trial=True),
    Kill("sigterm during a sweep trial", signal.SIGTERM,
         lambda work, since: any(_training(d, since) for d in _trial_dirs(work)), hits="trial"),
    # the jobs that log once at their end: significance, gate, finalize
    Kill("sigkill in the jobs after the significance test", signal.SIGKILL,
         lambda work, since: (_results(work) / "significance" / "significance.json").exists()),
]


def _observe(work: Path) -> dict:
    """What a stopped workflow left: the baseline's last epoch, the finished sweep trials (their trial.json,
    run.json and when metrics.json was written) and the slots whose trial was interrupted (started, not finished)."""
    res = _results(work)
    finished = {d.name: {"trial": json.loads((d / "trial.json").read_text()),
                         "run": json.loads((d / "run.json").read_text()),
                         "metrics_mtime": (d / "metrics.json").stat().st_mtime_ns}
                for d in _trial_dirs(work) if (d / "trial.json").exists()}
    interrupted = [int(d.name.removeprefix("trial")) for d in _trial_dirs(work)
                   if (d / "run.json").exists() and not (d / "trial.json").exists()]
    # an interrupted start had recorded its MLflow run in run.json, or was killed before (then its run, if it
    # was created at all, is found by its run_dir tag when the slot starts again)
    recorded = [slot for slot in interrupted
                if json.loads((_trials(work) / f"trial{slot}" / "run.json").read_text()).get("mlflow_run_id")]
    return {"baseline_epoch": _epoch(res / "baseline"),
            "baseline_finished": (res / "baseline" / "metrics.json").exists(),
            "finished_trials": finished, "interrupted_slots": interrupted, "recorded_slots": recorded}


@dataclass
class Runs:
    reference: Path
    work: Path


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Runs:
    """The reference run, then the same workflow killed at each row of KILLS in turn and run once more."""
    tmp = tmp_path_factory.mktemp("kills")
    runs = Runs(tmp / "reference", tmp / "killed")
    for d in (runs.reference, runs.work):
        d.mkdir()
        write_config(d / "config.yaml", {EXP: _experiment()})
    proc = snakemake(runs.reference, "--cores", "2", TARGET, configfile=runs.reference / "config.yaml", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # --nolock: a Snakemake killed hard leaves its lock behind, which a user clears with `snakemake --unlock`
    # (another start of the workflow, parsing it for nothing here: nothing else runs in this directory)
    cmd = snakemake_cmd(runs.work, "--cores", "2", "--nolock", TARGET, configfile=runs.work / "config.yaml")
    for kill in KILLS:
        log = tmp / f"{kill.name.replace(' ', '_')}.log"
        since = time.time()
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True,
                                    preexec_fn=ctrl_c_reaches)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and not kill.ready(runs.work, since):
            time.sleep(0.1)
        assert proc.poll() is None, (f"the workflow ended before {kill.name} could be killed "
                                     f"(rc {proc.returncode})\n{log.read_text()[-3000:]}")
        os.killpg(proc.pid, kill.sig)  # the whole process group: Snakemake and the jobs it started
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"snakemake did not stop within 120 s of {kill.sig.name} ({kill.name})\n"
                        f"{log.read_text()[-2000:]}")
        kill.seen = _observe(runs.work)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return runs


# --- what each kill hit, and how it was recovered ------------------------------------------------------------


def _check_baseline(work: Path, kill: Kill) -> None:
    """The killed baseline had not finished; the next starts resumed it from checkpoints/last.pt; its history,
    in history.csv and in MLflow, has every epoch once; run.json keeps how each start ended."""
    assert not kill.seen["baseline_finished"] and 3 <= kill.seen["baseline_epoch"] < EPOCHS, kill.seen
    run_dir = _results(work) / "baseline"
    hits = [k for k in KILLS if k.hits == "baseline"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["attempt"] == len(hits) + 1
    # a caught signal ends a start as interrupted; after SIGKILL the start is found still "running": killed
    expected = {signal.SIGINT: "interrupted", signal.SIGTERM: "interrupted", signal.SIGKILL: "killed"}
    assert [e["status"] for e in info["earlier"]] == [expected[k.sig] for k in hits]
    log = (_results(work) / "logs" / "train_baseline.log").read_text()
    assert "resuming from checkpoints/last.pt" in log
    assert f"done, {ToyTrainer.primary_metric} best" in log
    assert list(pd.read_csv(run_dir / "history.csv")["step"]) == list(range(1, EPOCHS + 1))
    client, _ = mlflow_runs(work, EXP)
    steps = sorted(m.step for m in client.get_metric_history(info["mlflow_run_id"], ToyTrainer.primary_metric))
    assert steps == list(range(1, EPOCHS + 1))  # nothing lost or doubled across the kills


def _check_trial(work: Path, kill: Kill) -> None:
    """The trials finished before the kill are never trained again; the interrupted slot's trial is told FAIL
    (interrupted) in the study, its files are kept aside, and the slot is asked again until a trial completes."""
    assert kill.seen["interrupted_slots"], f"{kill.name}: no sweep trial was interrupted"
    assert kill.seen["finished_trials"] or not kill.finished_trial, kill.seen
    trials = _trials(work)
    # never trained again: the same trial, the same single start, metrics.json never rewritten. (trial.json itself
    # may be: with two jobs at a time, a kill can land after a trial wrote it but before its job ended, and
    # Snakemake then runs that job again, which finds the trial complete and writes the same trial.json)
    for name, before in kill.seen["finished_trials"].items():
        d = trials / name
        assert json.loads((d / "trial.json").read_text()) == before["trial"], name
        run = json.loads((d / "run.json").read_text())
        assert (run["attempt"], run["started"]) == (before["run"]["attempt"], before["run"]["started"]), name
        assert (d / "metrics.json").stat().st_mtime_ns == before["metrics_mtime"], name
    summary = json.loads((trials.parent / "sweep.json").read_text())
    assert sorted(t["slot"] for t in summary["trials"]) == list(range(N_TRIALS))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(trials.parent / "study.journal")))
    study = optuna.load_study(study_name=summary["study"], storage=storage)
    for slot in kill.seen["interrupted_slots"]:
        times = sum(slot in k.seen["interrupted_slots"] for k in KILLS if k.hits == "trial")
        attempts = [t for t in study.trials if t.user_attrs.get("slot") == slot]
        assert [t.state.name for t in attempts] == ["FAIL"] * times + ["COMPLETE"]  # failed, then re-asked
        assert all(t.user_attrs.get("fail_kind", "interrupted") == "interrupted" for t in attempts[:-1])
    # every interrupted attempt is set aside under trials/interrupted, and its MLflow run ended as interrupted
    aside = list((trials / "interrupted").iterdir())
    _, runs = mlflow_runs(work, EXP)
    n_killed = sum(len(k.seen["interrupted_slots"]) for k in KILLS if k.hits == "trial")
    assert len(aside) == n_killed
    n_recorded = sum(len(k.seen["recorded_slots"]) for k in KILLS if k.hits == "trial")
    n_ended = sum(r.data.tags.get("status") == "interrupted" and "slot" in r.data.tags for r in runs)
    assert n_recorded <= n_ended <= n_killed and n_recorded >= 1


@pytest.mark.parametrize("kill", KILLS, ids=[k.name for k in KILLS])
def test_each_kill_hit_its_job_and_the_next_start_recovered_it(killed, kill):
    if kill.hits == "baseline":
        _check_baseline(killed.work, kill)
    elif kill.hits == "trial":
        _check_trial(killed.work, kill)
    else:  # the jobs after the significance test: their outputs were there, the final result not yet
        assert kill.seen["baseline_finished"] and len(kill.seen["finished_trials"]) == N_TRIALS


# --- killed anywhere, run again, ends as if never killed -----------------------------------------------------


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
    client, runs = mlflow_runs(work, EXP)
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
        # minus the clock the time budget reads (minutes since the baseline started): a killed workflow took longer
        "decision": {k: v for k, v in load(res / "significance" / "decision.json").items() if k != "minutes_elapsed"},
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


def test_run_again_after_every_kill_ends_as_if_never_killed(killed):
    assert _files(killed.work) == _files(killed.reference), _files(killed.work) ^ _files(killed.reference)
    assert _numbers(killed.work) == _numbers(killed.reference)
    _same_metrics(_mlflow_results(killed.reference), _mlflow_results(killed.work))
