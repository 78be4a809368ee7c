"""Training one run directory: the phase behind `tunewise train` and every run the other phases train (sweep
trials, iterative rounds, the final model).

A start of a run continues the previous one when that one trained the same config and seed (a rerun of a killed
job, a SLURM requeue); otherwise the run is trained from scratch. One MLflow run per run directory, however
many starts it takes. A diverged run and a pruned trial are results (metrics.json with their status), an
out-of-memory start is recorded with its batch size so the retry trains a smaller one.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunewise.phases import CliError
from tunewise.phases import tracked


class OutOfMemory(CliError):
    """Training ran out of memory; run.json records the batch size that did not fit."""


@dataclass
class Attempt:
    """One start of a run directory: what it trains and the MLflow run it logs to."""
    exp: dict
    run: object  # RunDir
    config: dict
    seed: int
    threads: int
    device: object
    batch: dict | None
    tracker: object = None
    run_id: str | None = None
    reuse: bool = False  # the MLflow run of the previous start goes on
    resuming: bool = False  # training goes on from checkpoints/last.pt


def train_config(exp: dict, exp_dir: Path, config_file: str | Path | None = None, side: str | None = None,
                 sets: list[str] | None = None) -> dict:
    """The config `tunewise train` trains: --config-file (the diagnosis' optimization config for the optimized
    side), else the experiment's baseline, with the --set overrides applied."""
    from tunewise.config import load_yaml, parse_override, set_dotted

    if not config_file and side == "optimized":
        config_file = Path(exp_dir) / "diagnosis" / "optimization_config.yaml"
    config = load_yaml(config_file) if config_file else exp["baseline"]
    for item in sets or []:
        key, value = parse_override(item)
        set_dotted(config, key, value)
    return config


def train_run(exp: dict, exp_dir: Path, run_dir: str | Path, config: dict, seed: int | None = None, *,
              phase: str = "baseline", side: str | None = None, rule: str | None = None, run_name: str | None = None,
              threads: int | None = None, parent: str | None = None, tags: dict | None = None,
              reuse_from: str | Path | None = None, previous_attempt: dict | None = None,
              reporter_wrapper: Callable | None = None, force: bool = False) -> dict:
    """Train `config` with `seed` (default: the experiment's) into `run_dir`; returns its metrics with `status`.

    `parent` names the experiment's MLflow parent run (seed runs: significance); `reuse_from` is the
    metrics.json of a finished run adopted when it trained the same config and seed; `previous_attempt` the
    run.json of a start set aside elsewhere (a sweep slot's archived attempt); `reporter_wrapper` wraps the
    epoch reporter (a sweep trial reports to Optuna and may be pruned)."""
    from tunewise.devices import resolve_device, set_threads
    from tunewise.runs import RunDir
    from tunewise.trainers import get_trainer

    seed = exp["seed"] if seed is None else seed
    trainer = get_trainer(exp["trainer"])
    threads = set_threads(threads)
    device = resolve_device(exp["device"])
    run = RunDir(run_dir)
    if run.is_finished() and not force:
        print(f"{run.path}: already finished (status {run.status}); --force to train again")
        return run.require_finished()
    # the previous start of this run (a sweep passes the one it set aside before re-asking the slot)
    previous = run.info() or previous_attempt or {}
    config, batch = attempt_batch(trainer, config, previous)
    source = reusable_run(reuse_from, config, seed)
    attempt = Attempt(exp, run, config, seed, threads, device, batch)
    _begin(attempt, previous, source is None, force)
    meta = {"phase": phase, "side": side, "experiment": exp["name"]}
    parent = parent or ("significance" if phase == "seed" else None)
    name = run_name or f"{phase}" + (f"-{side}-seed{seed}" if phase == "seed" else "")
    _open_mlflow_run(attempt, previous, meta, exp_dir, parent, name,
                     tracked.base_tags(exp, phase, rule, config) | {"seed": seed, "side": side, "run_dir": str(run.path)}
                     | (tags or {}))
    if source is not None:
        return adopt_run(source, run, attempt.tracker, attempt.run_id)
    if batch is not None and batch["used"] != batch["configured"]:
        print(f"{run.path}: {batch['key']}={batch['used']} instead of {batch['configured']}: an earlier start of "
              "this run ran out of memory")
    if attempt.resuming:
        print(f"{run.path}: resuming from checkpoints/last.pt")
    return _fit(attempt, trainer, reporter_wrapper)


def _begin(attempt: Attempt, previous: dict, may_resume: bool, force: bool) -> None:
    """Continue the previous start or clear it. A start continues the previous one (what Snakemake's rerun of
    a killed job and a SLURM requeue do) only when that one trained this very config and seed; otherwise its
    last.pt would mix two trainings."""
    run = attempt.run
    same = (not force and run.config_path.exists() and previous.get("seed") == attempt.seed
            and run.config() == attempt.config)
    if not same:
        run.clear()
    attempt.resuming = same and may_resume and (run.checkpoints / "last.pt").exists()
    attempt.tracker = tracked.tracker(attempt.exp)
    # one MLflow run per run directory, however many starts it takes; a killed attempt whose training is
    # not continued keeps its run, ended KILLED and tagged status=interrupted
    old_id = previous.get("mlflow_run_id")
    old_status = attempt.tracker.run_status(old_id) if old_id else None
    attempt.reuse = same and old_status is not None
    if old_status == "RUNNING" and not attempt.reuse:
        attempt.tracker.supersede(old_id, f"killed; {run.path} was started again with another config or from scratch")
    # a start killed between creating its MLflow run and writing the run's id to run.json left a run nothing
    # points at: found by its run_dir tag, it is ended as interrupted instead of staying RUNNING forever
    for orphan in attempt.tracker.running_runs("run_dir", str(run.path)):
        if orphan != old_id:
            attempt.tracker.supersede(orphan, f"killed before its run id was recorded; {run.path} was started again")


def _open_mlflow_run(attempt: Attempt, previous: dict, meta: dict, exp_dir: Path, parent: str | None, name: str,
                     tags: dict) -> None:
    """run.json of this start, and its MLflow run: the previous start's, resumed, or a new one."""
    tracker, run, batch = attempt.tracker, attempt.run, attempt.batch
    old_id = previous.get("mlflow_run_id")
    if batch is not None:
        meta["batch_size"] = batch
    run.start(attempt.config, attempt.seed, meta if attempt.reuse else {**meta, "mlflow_run_id": None})
    parent_id = tracked.parent_run(tracker, attempt.exp, exp_dir, parent) if parent else None
    params = {"seed": attempt.seed, "threads": attempt.threads, "device": str(attempt.device), **attempt.config}
    if attempt.reuse:
        attempt.run_id = tracker.resume_run(old_id)
        tracker.log_params(attempt.run_id, params, only_new=True)  # a start killed before its params were all logged
        if not tracker.has_dataset(attempt.run_id):  # ... or before its dataset input was logged
            _log_dataset(attempt, exp_dir)
        return
    if batch is not None and batch["used"] != batch["configured"]:
        tags |= {"batch_size_configured": batch["configured"], "retry_of": old_id}
    attempt.run_id = tracker.start_run(name, tags, parent_id=parent_id)
    tracker.log_params(attempt.run_id, params)
    run.update_info(mlflow_run_id=attempt.run_id)
    _log_dataset(attempt, exp_dir)


def _log_dataset(attempt: Attempt, exp_dir: Path) -> None:
    """The data the run trains on as its MLflow dataset input: the user's data.path or the prepared folder,
    identified by the fingerprint prepare-data recorded (else the data settings' hash), with its row counts."""
    from tunewise.config import config_hash
    from tunewise.runs import read_json_if_exists

    data = attempt.config.get("data") or {}
    source = data.get("path") if data.get("source") == "path" else data.get("prepared_dir")
    if not source:
        return  # a trainer without a data folder of its own (its data made in memory): nothing to point at
    from tunewise.phases.data import ready_path

    ready = read_json_if_exists(ready_path(attempt.exp)) or {}
    digest = str(ready.get("fingerprint") or config_hash({k: v for k, v in data.items() if k != "prepared_dir"}))
    profile = {k: ready[k] for k in ("n_rows", "counts") if ready.get(k) is not None}
    attempt.tracker.log_dataset(attempt.run_id, f"{attempt.exp['name']}-data", digest, str(Path(source).resolve()),
                                profile)


def _fit(attempt: Attempt, trainer, reporter_wrapper: Callable | None) -> dict:
    from tunewise.trainers.base import NonFiniteLoss, Pruned
    from tunewise.tracking import EpochReporter

    run, exp = attempt.run, attempt.exp
    tracked_reporter = reporter = EpochReporter(attempt.tracker, attempt.run_id)
    if attempt.reuse:
        tracked_reporter.sync()  # metrics a killed start logged are not sent twice, even from a restart at epoch 1
    if reporter_wrapper is not None:  # a sweep trial reports to Optuna too, and may be pruned
        reporter = reporter_wrapper(reporter)
    try:
        metrics = trainer.run(attempt.config, attempt.seed, run, reporter, attempt.device, exp["metric"])
        tracked_reporter.flush()
    except (NonFiniteLoss, Pruned) as e:
        tracked_reporter.flush()
        # a diverged run is a finding for the diagnosis and a pruned trial an answer for the sweep,
        # not crashes of the workflow
        return _stopped(attempt, trainer, "pruned" if isinstance(e, Pruned) else "diverged", str(e))
    except (KeyboardInterrupt, SystemExit) as e:
        # No MLflow call here: the interrupt may have landed inside one, and the store's connection pool can
        # then block forever. The MLflow run stays RUNNING and is picked up again when the run resumes.
        run.fail(f"interrupted ({type(e).__name__})", status="interrupted")
        raise
    except Exception as e:
        _failed(attempt, e)
        raise
    return _done(attempt, metrics)


def _stopped(attempt: Attempt, trainer, status: str, reason: str) -> dict:
    """metrics.json of a run that diverged or was pruned: the best and final values it reached before."""
    from tunewise.trainers import budget

    run, metric = attempt.run, attempt.exp["metric"]
    history = run.history()  # empty when the run stopped before its first epoch
    metrics = {
        "primary": {"name": metric["name"], "direction": metric["direction"], "best": None, "final": None},
        "best_step": 0,
        "epochs_run": int(len(history)),
        "epochs_planned": budget(trainer, attempt.config),
        "stopped_early": True,
        "device": str(attempt.device),
    }
    name = metric["name"]
    if name in history and history[name].notna().any():
        values = history[name]
        at = values.idxmax() if metric["direction"] == "max" else values.idxmin()
        metrics["primary"]["best"] = float(values[at])
        metrics["primary"]["final"] = float(values.dropna().iloc[-1])
        metrics["best_step"] = int(history["step"][at])
    run.finish(metrics, status=status, reason=reason)
    attempt.tracker.set_tags(attempt.run_id, {"status": status, "reason": reason})
    attempt.tracker.end_run(attempt.run_id, "KILLED" if status == "pruned" else "FAILED")
    print(f"{run.path}: {status} ({reason})", file=sys.stderr)
    return metrics | {"status": status, "reason": reason}


def _failed(attempt: Attempt, error: Exception) -> None:
    """A start that crashed: run.json says why; out of memory becomes OutOfMemory (its message is the story)."""
    from tunewise.train.oom import is_out_of_memory

    oom = is_out_of_memory(error)
    reason = oom_reason(error, attempt.batch) if oom else f"{type(error).__name__}: {error}"
    attempt.run.update_info(status="failed", reason=reason, out_of_memory=oom)
    attempt.tracker.set_tags(attempt.run_id, {"status": "failed", "reason": reason[:5000]})
    attempt.tracker.end_run(attempt.run_id, "FAILED")
    if oom:  # the message is the whole story; Snakemake retries the job (resources.retries)
        raise OutOfMemory(f"{attempt.run.path}: {reason}") from None


def _done(attempt: Attempt, metrics: dict) -> dict:
    run, tracker, run_id = attempt.run, attempt.tracker, attempt.run_id
    metrics["threads"] = attempt.threads
    run.finish(metrics)
    tracker.log_metrics(run_id, {f"best/{k}": v for k, v in metrics["best"].items() if k != "step"})
    tracker.log_artifact(run_id, run.config_path)
    tracker.log_artifact(run_id, run.history_path)
    tracker.log_artifact(run_id, run.metrics_path)
    tracker.end_run(run_id)
    p = metrics["primary"]
    print(f"{run.path}: done, {p['name']} best {p['best']:.4f} at step {metrics['best_step']} ({metrics['wall_seconds']:.1f}s)")
    return metrics | {"status": "done"}


def attempt_batch(trainer, config: dict, previous: dict) -> tuple[dict, dict | None]:
    """The config this start trains, with its batch size halved once per out-of-memory start of the same run
    (tunewise.train.oom), and the batch-size record for run.json: {key, configured, used}; None for a trainer
    without an integer batch_size knob."""
    from tunewise.config import get_dotted, set_dotted
    from tunewise.train.oom import batch_size_for

    key = (getattr(trainer, "knobs", None) or {}).get("batch_size")
    if not isinstance(key, str):
        return config, None
    try:
        configured = get_dotted(config, key)
    except KeyError:
        return config, None
    if not isinstance(configured, int) or isinstance(configured, bool):
        return config, None
    used = batch_size_for(configured, previous)
    if used != configured:
        config = copy.deepcopy(config)
        set_dotted(config, key, used)
    return config, {"key": key, "configured": configured, "used": used}


def oom_reason(error: BaseException, batch: dict | None) -> str:
    what = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
    if batch is None:
        return (f"out of memory ({what}); the trainer has no integer batch_size knob to make smaller, so a retry "
                "only gets more memory (mem_mb grows with the attempt)")
    key, used = batch["key"], batch["used"]
    if used <= 1:
        return f"out of memory at {key}={used} ({what}); there is no smaller batch to retry with"
    return (f"out of memory at {key}={used} ({what}): retrying with a smaller batch, {key}={used // 2}, from "
            "scratch (when Snakemake retries the job: resources.retries)")


def reusable_run(metrics_path: str | Path | None, config: dict, seed: int):
    """The finished run behind `metrics_path` when it trained exactly `config` with `seed`, else None.

    The workflow trains the same config with the same seed more than once (the baseline and the baseline
    side's seed 0, the targeted run and the optimized side's seed 0, the final run): such a run is adopted,
    not trained again. The check is on the files, so a run of another config or seed is never taken.
    """
    from tunewise.config import load_yaml
    from tunewise.runs import RunDir

    if not metrics_path:
        return None
    source = RunDir(Path(metrics_path).parent)
    if source.status != "done" or not source.config_path.exists():
        return None
    if source.info().get("seed") != seed or load_yaml(source.config_path) != config:
        return None
    return source


def adopt_run(source, run, tracker, run_id: str) -> dict:
    """Make `run` a copy of the finished `source` run (checkpoints hard-linked) and give its MLflow run the
    same per-epoch history, so every consumer sees a complete run of its own."""

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.rmtree(run.checkpoints, ignore_errors=True)
    shutil.copytree(source.checkpoints, run.checkpoints, copy_function=link_or_copy)
    for name in os.listdir(source.path):  # history.csv and trainer files such as confusion_val.json, targets/
        path = source.path / name
        if path.is_file() and name not in ("run.json", "metrics.json", "config.yaml"):
            shutil.copy2(path, run.path / name)
        elif path.is_dir() and name != "checkpoints":
            shutil.rmtree(run.path / name, ignore_errors=True)
            shutil.copytree(path, run.path / name, copy_function=link_or_copy)
    metrics = {**source.require_finished(), "reused_from": str(source.path)}
    metrics.pop("status", None)
    run.update_info(reused_from=str(source.path))
    history = run.history()
    if len(history):  # what an adoption killed half-way already logged is not logged twice
        tracker.log_rows(run_id, history.to_dict("records"), tracker.logged_steps(run_id))
    tracker.set_tags(run_id, {"reused_from": str(source.path)})
    run.finish(metrics)
    tracker.log_metrics(run_id, {f"best/{k}": v for k, v in (metrics.get("best") or {}).items() if k != "step"})
    for path in (run.config_path, run.history_path, run.metrics_path):
        if path.exists():
            tracker.log_artifact(run_id, path)
    tracker.end_run(run_id)
    print(f"{run.path}: same config and seed as {source.path}: adopted its finished run instead of training again")
    return metrics | {"status": "done"}
