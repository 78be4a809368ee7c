"""What every phase logs to MLflow the same way: the tracker of an experiment, the tags of a run, the run of a
job that logs once at its end, and the files a phase wrote (reports under `reports/`)."""
from __future__ import annotations

import os
from pathlib import Path


def tracker(exp: dict):
    from tunewise.tracking import Tracker

    return Tracker(exp["tracking"]["uri"], exp["name"])


def base_tags(exp: dict, phase: str, rule: str | None, config: dict | None = None) -> dict:
    from tunewise.config import config_hash
    from tunewise.runs import git_sha

    tags = {"phase": phase, "trainer": exp["trainer"], "tunewise.experiment": exp["name"], "git_sha": git_sha()}
    if exp.get("round"):  # a later optimization round (tunewise.phases.rounds): its runs say which
        tags["round"] = str(exp["round"]["index"])
    if rule:
        tags["rule"] = rule
    if config is not None:
        tags["config_hash"] = config_hash(config)
    wildcards = os.environ.get("TUNEWISE_WILDCARDS")
    if wildcards:
        tags["wildcards"] = wildcards
    return tags


def parent_run(tracker, exp: dict, exp_dir: Path, name: str, rule: str | None = None) -> str:
    """The experiment's parent run `name` (significance, sweep, iterative), its id kept in exp_dir/tracking.json;
    a later optimization round has its own, named after it (significance-round2)."""
    if exp.get("round") and name != "workflow":
        name = f"{name}-round{exp['round']['index']}"
    return tracker.parent_run(name, base_tags(exp, name, rule), Path(exp_dir) / "tracking.json")


def log_experiment_files(exp: dict, exp_dir: Path, rule: str | None, files: dict) -> str:
    """Files about the experiment as a whole (its resolved config, the gates and their checklists, the index of
    all experiments) on its one `workflow` run, made by the first job that logs there and kept in tracking.json:
    a job that runs again replaces its files there, it never adds a run. The run is ended after each job, so
    the MLflow UI never shows it as still running. `files`: {path: artifact folder or None}."""
    t = tracker(exp)
    rnd = exp.get("round") or {}
    if rnd:  # a later optimization round's files go to the experiment's run too, under round<r>/
        exp_dir = Path(rnd["base_dir"])
        files = {path: "/".join(p for p in (f"round{rnd['index']}", folder) if p) for path, folder in files.items()}
    run_id = parent_run(t, exp, exp_dir, "workflow", rule)
    for path, folder in files.items():
        t.log_artifact(run_id, path, folder)
    t.end_run(run_id)
    return run_id


def job_run(tracker, name: str, tags: dict, state: Path) -> str:
    """A new MLflow run for a job that logs once at its end (diagnose). Its id is kept in `state`, so when the
    job is killed and runs again, the run the killed attempt left RUNNING is ended as interrupted (KILLED)
    instead of staying beside the new one as a second, unfinished result."""
    from tunewise.runs import read_json, write_json

    old = read_json(state).get("run_id") if state.exists() else None
    if old:
        tracker.supersede(old, "killed; the job ran again")
    run_id = tracker.start_run(name, tags)
    write_json(state, {"run_id": run_id})
    return run_id


def log_files(tracker, run_id: str, paths) -> None:
    """Artifacts of a run: markdown reports and their figures under `reports/`, the rest at the top."""
    for path in paths:
        tracker.log_artifact(run_id, path, "reports" if Path(path).suffix in (".md", ".png") else None)
