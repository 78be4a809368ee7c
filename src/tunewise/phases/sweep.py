"""Phase 4, strategy `sweep`: one Optuna study per experiment, one Snakemake job per trial slot.

Each `sweep_trial` job owns a *slot* (the Snakemake wildcard `trial`): it asks the shared study for a
trial, trains it and tells the outcome. The slot is stored on the trial (user attribute `slot`), so a
rerun knows which trials are already done and never recomputes them, and a trial whose job was
killed is told FAIL ("interrupted") and its slot re-asked. The study lives in a journal file (several
processes on one host) or an RDB URL (a cluster); never SQLite for parallel trials.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

SAMPLERS = ("grid", "random", "qmc", "tpe", "gp", "cmaes")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
INTERRUPTED = "interrupted"
# failures that are a result of the trial itself (its slot is done); anything else is re-asked
FINAL_FAILURES = ("diverged",)


from tunewise.space import SweepError, grid, resolve_space  # noqa: E402,F401  (re-exported: sweep.py was their home)


# --- search space ---------------------------------------------------------------------------


def suggest(trial: optuna.Trial, space: dict) -> dict:
    params = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                            step=int(spec.get("step") or 1))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                              step=spec.get("step") or None)
    return params


# --- study ----------------------------------------------------------------------------------


def study_name(exp: dict, space: dict, base_config: dict) -> str:
    """A new study when anything that shapes the trials changes, so a rerun never mixes two sweeps."""
    from tunewise.config import config_hash

    sweep = exp["optimize"]["sweep"]
    key = {k: sweep[k] for k in ("sampler", "pruner", "seed", "epochs", "grid_points")}
    digest = hashlib.sha256(
        json.dumps({"sweep": key, "space": space, "base": config_hash(base_config), "metric": exp["metric"]},
                   sort_keys=True, default=str).encode()
    ).hexdigest()[:10]
    return f"tunewise-{exp['name']}-{digest}"


def storage(url: str | None, journal: Path):
    if url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


def make_sampler(name: str, seed: int, space: dict, grid_points: int, slot: int = 0, attempt: int = 0):
    """Every job builds its own sampler. Seeds that vary per slot keep parallel jobs from proposing the same
    point; grid and QMC keep one seed, since the grid's order (GridSampler shuffles it with the seed; a trial
    stores its index into it) and QMC's scrambling must be the same in every process."""
    job_seed = seed + 1000 * slot + attempt
    if name == "grid":
        return optuna.samplers.GridSampler(grid(space, grid_points), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=job_seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        # Optuna 5's default is multivariate with a constant liar, which suits parallel trials
        return optuna.samplers.TPESampler(seed=job_seed, n_startup_trials=max(2, min(10, len(space) + 1)))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=job_seed, n_startup_trials=max(2, min(10, len(space) + 1)))
    if name == "cmaes":
        # CMA-ES handles float/int; categorical parameters fall back to independent random sampling
        return optuna.samplers.CmaEsSampler(seed=job_seed, warn_independent_sampling=False, n_startup_trials=1)
    raise SweepError(f"optimize.sweep.sampler: unknown sampler {name!r} (have: {', '.join(SAMPLERS)})")


def make_pruner(name: str, epochs: int, n_trials: int):
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # at least two finished trials before a median means anything
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, n_trials // 4)),
                                           n_warmup_steps=max(1, epochs // 4))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 8), reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 8), max_resource=epochs,
                                              reduction_factor=3)
    raise SweepError(f"optimize.sweep.pruner: unknown pruner {name!r} (have: {', '.join(PRUNERS)})")


def open_study(exp: dict, space: dict, base_config: dict, journal: Path, slot: int = 0, attempt: int = 0,
               epochs: int | None = None) -> optuna.Study:
    sweep = exp["optimize"]["sweep"]
    from tunewise.config import get_dotted
    from tunewise.trainers import budget_key, get_spec

    # the pruners' resource is the trainer's budget in history steps (epochs, or a search's steps)
    key = budget_key(get_spec(exp["trainer"])) if exp.get("trainer") else "train.epochs"
    epochs = epochs or int(get_dotted(base_config, key))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=study_name(exp, space, base_config),
        storage=storage(sweep.get("storage"), journal),
        sampler=make_sampler(sweep["sampler"], int(sweep["seed"]), space, int(sweep["grid_points"]), slot, attempt),
        pruner=make_pruner(sweep["pruner"], epochs, int(sweep["n_trials"])),
        direction="maximize" if exp["metric"]["direction"] == "max" else "minimize",
        load_if_exists=True,
    )


def slot_trials(study: optuna.Study, slot: int) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("slot") == slot]


def finished_trial(study: optuna.Study, slot: int):
    """The slot's finished trial (complete, pruned, or failed for a reason of its own), if any."""
    for t in slot_trials(study, slot):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return t
        if t.state == TrialState.FAIL and t.user_attrs.get("fail_kind") in FINAL_FAILURES:
            return t
    return None


def fail_stale(study: optuna.Study, slot: int) -> list[int]:
    """Trials of this slot left RUNNING by a job that died without telling (SIGKILL, node lost): recorded as
    failed, so the slot is re-asked. Only one job per slot runs at a time (Snakemake's output lock).
    A failed trial without a `fail_kind` in FINAL_FAILURES counts as interrupted."""
    stale = [t.number for t in slot_trials(study, slot) if t.state == TrialState.RUNNING]
    for number in stale:
        tell(study, number, state=TrialState.FAIL)
    return stale


# failures that say nothing about the trial's point: the re-asked trial trains the same point again, so a
# kill loses nothing and the sweep ends as it would have without it ("out_of_memory" only when the batch size
# is not searched: the retry then trains the same point with half the batch)
RETRY_SAME_POINT = (INTERRUPTED, "out_of_memory")


def retry_point(study: optuna.Study, slot: int, batch_key: str | None, space: dict):
    """The slot's last trial when the re-ask should train its point again (it was killed or interrupted, or
    it ran out of memory with a batch size the sampler does not choose), else None: a point that failed with
    an error gets a fresh one. Call after fail_stale (a trial left RUNNING by a killed job counts as killed)."""
    trials = slot_trials(study, slot)
    if not trials:
        return None
    last = max(trials, key=lambda t: t.number)
    kind = last.user_attrs.get("fail_kind", INTERRUPTED)  # none: a job killed before it could tell
    if last.state != TrialState.FAIL or kind not in RETRY_SAME_POINT:
        return None
    if kind == "out_of_memory" and batch_key in space:
        return None
    return last


def ask(study: optuna.Study, slot: int, lock: Path, again=None) -> optuna.Trial:
    """A trial for the slot; `again` (a FrozenTrial) is asked again with its params and sampler state (a grid
    point keeps its grid id), as Optuna's RetryFailedTrialCallback does. The retry is queued as a WAITING
    trial, which any job's ask would take: every ask goes through one file lock per study, so only this
    slot's job takes it."""
    from filelock import FileLock

    with FileLock(str(lock), timeout=600):
        if again is not None:
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=again.params, distributions=again.distributions,
                user_attrs={"slot": slot, "retry_of": again.number},
                system_attrs={**again.system_attrs, "failed_trial": again.number},
            ))
        trial = study.ask()
    trial.set_user_attr("slot", slot)
    return trial


def tell(study: optuna.Study, trial, value: float | None = None, state: TrialState | None = None) -> None:
    """study.tell for a trial run as its own job. The grid sampler asks the study to stop once every grid
    point has been tried, and outside study.optimize that request raises after the trial is stored: the
    last trial's job would fail although its answer is recorded. Here there is no loop to stop."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def tell_failed(study: optuna.Study, trial: optuna.Trial, kind: str, reason: str) -> None:
    trial.set_user_attr("fail_kind", kind)
    trial.set_user_attr("reason", reason[:500])
    tell(study, trial, state=TrialState.FAIL)


def trial_config(base_config: dict, params: dict, epochs: int | None, budget_key: str = "train.epochs") -> dict:
    from tunewise.config import set_dotted

    config = copy.deepcopy(base_config)
    for key, value in params.items():
        set_dotted(config, key, value)
    if epochs:
        set_dotted(config, budget_key, int(epochs))
    return config


class TrialReporter:
    """Wraps the run's EpochReporter: reports the primary metric to the trial each epoch and raises Pruned
    when the pruner says so (after the epoch's row and checkpoint are written)."""

    def __init__(self, inner, trial: optuna.Trial, metric: str, last_step: int | None = None):
        self.inner, self.trial, self.metric, self.last_step = inner, trial, metric, last_step

    def epoch(self, step: int, row: dict) -> None:
        from tunewise.trainers.base import Pruned

        self.inner.epoch(step, row)
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step)
        # pruning after the last epoch saves nothing and would throw away a finished trial
        if (self.last_step is None or step < self.last_step) and self.trial.should_prune():
            raise Pruned(f"pruned by the {type(self.trial.study.pruner).__name__} at step {step} ({self.metric} = {value:.4g})")

    def replay(self, rows: list[dict]) -> None:
        self.inner.replay(rows)


# --- summary --------------------------------------------------------------------------------


def trial_record(t, run_dir: Path) -> dict:
    from tunewise.runs import RunDir, finite_float

    metrics = RunDir(run_dir).metrics()
    value = t.value if t.state == TrialState.COMPLETE else (metrics.get("primary") or {}).get("best")
    if value is None and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    return {
        "slot": t.user_attrs.get("slot"),
        "number": t.number,
        "state": t.state.name,
        "value": finite_float(value),  # metrics.json writes an infinity as a string
        "params": dict(t.params),
        "run_dir": str(run_dir),
        "best_step": metrics.get("best_step"),
        "epochs_run": metrics.get("epochs_run"),
        "epochs_planned": metrics.get("epochs_planned"),
        "reason": t.user_attrs.get("reason"),
    }


def summarise(study: optuna.Study, exp: dict, space: dict, trials_dir: Path, n_trials: int) -> dict:
    """sweep.json: every slot's finished trial, the best complete one and parameter importances."""
    records = []
    for slot in range(n_trials):
        t = finished_trial(study, slot)
        if t is None:
            raise SweepError(f"sweep slot {slot} of {exp['name']} has no finished trial; run its sweep_trial job")
        records.append(trial_record(t, trials_dir / f"trial{slot}"))
    complete = [r for r in records if r["state"] == "COMPLETE" and r["value"] is not None]
    if not complete:
        states = ", ".join(f"slot {r['slot']}: {r['state']} ({r['reason']})" for r in records)
        raise SweepError(f"no sweep trial of {exp['name']} completed, so there is no best config: {states}")
    higher = exp["metric"]["direction"] == "max"
    best = max(complete, key=lambda r: r["value"] if higher else -r["value"])
    return {
        "experiment": exp["name"],
        "study": study.study_name,
        "metric": exp["metric"],
        "sampler": exp["optimize"]["sweep"]["sampler"],
        "pruner": exp["optimize"]["sweep"]["pruner"],
        "n_trials": n_trials,
        "space": space,
        "trials": records,
        "states": {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "best": {k: best[k] for k in ("slot", "number", "value", "params", "run_dir")},
        "importance": importance(study, [r["number"] for r in complete]),
    }


def importance(study: optuna.Study, numbers: list[int]) -> dict:
    """fANOVA importances over the slots' complete trials; {} when there are too few to say anything."""
    if len(numbers) < 3:
        return {}
    keep = set(numbers)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number in keep]
    varying = [k for k in trials[0].params if len({repr(t.params.get(k)) for t in trials}) > 1]
    if not varying:
        return {}
    # evaluate on a study holding only these trials (earlier attempts must not count twice)
    view = optuna.create_study(direction=study.direction)
    view.add_trials(trials)
    try:
        result = optuna.importance.get_param_importances(
            view, params=varying, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (RuntimeError, ValueError):
        return {}
    return {k: float(v) for k, v in result.items()}


# --- the phase: one slot's trial, the study's best ------------------------------------------------------------


def setup(exp: dict, exp_dir: Path) -> tuple[dict, dict, int | None, Path]:
    """(space, base config, trial epochs, sweep dir) of an experiment's sweep."""
    from tunewise.config import load_yaml
    from tunewise.phases import CliError
    from tunewise.trainers import get_spec

    cfg = exp["optimize"]["sweep"]
    exp_dir = Path(exp_dir)
    if cfg["base"] == "optimized":
        base_path = exp_dir / "diagnosis" / "optimization_config.yaml"
    else:  # the run the diagnosis read: the baseline, or a later round's starting config (phases/rounds.py)
        from tunewise.runs import read_json_if_exists

        diagnosed = ((read_json_if_exists(exp_dir / "diagnosis" / "diagnosis.json") or {}).get("baseline") or {})
        base_path = Path(diagnosed.get("run_dir") or exp_dir / "baseline") / "config.yaml"
    if not base_path.exists():
        raise CliError(f"{base_path}: the sweep's base config (optimize.sweep.base: {cfg['base']}) is missing; run the diagnosis first")
    try:
        space = resolve_space(get_spec(exp["trainer"]).search_space(), cfg.get("space"))
    except SweepError as e:
        raise CliError(f"experiments.{exp['name']}.{e}") from None
    return space, load_yaml(base_path), cfg.get("epochs"), exp_dir / "optimize" / "sweep"


def run_slot(exp: dict, exp_dir: Path, slot: int, out: Path, *, threads: int | None = None,
             rule: str | None = None) -> dict:
    """One trial slot of the experiment's study: ask, train (reporting for pruning), tell; writes `out`
    (trial.json) once the trial is told and returns its record. A finished slot is only written again."""
    from tunewise.phases import CliError
    from tunewise.runs import RunDir, write_json

    space, base, epochs, sweep_dir = setup(exp, exp_dir)
    journal = sweep_dir / "study.journal"
    run_dir = sweep_dir / "trials" / f"trial{slot}"
    study = open_study(exp, space, base, journal, slot, epochs=epochs)
    done = finished_trial(study, slot)
    if done is None:
        study = _train_slot(exp, exp_dir, study, (space, base, epochs, sweep_dir), slot, threads, rule)
        done = finished_trial(study, slot)
    elif not RunDir(run_dir).is_finished():
        raise CliError(f"slot {slot} has finished trial {done.number} in {study.study_name} but {run_dir} is not a finished run")
    record = trial_record(done, run_dir)
    write_json(Path(out), {"study": study.study_name, **record})
    print(f"slot {slot}: trial {record['number']} {record['state']}, {exp['metric']['name']} = {record['value']}")
    return record


def archive_attempt(exp: dict, sweep_dir: Path, slot: int, attempt: int) -> dict:
    """Set a killed attempt's files aside (trials/interrupted/trial<slot>-attempt<k>) and end its MLflow run as
    superseded; returns its run.json ({} when the slot's folder holds nothing)."""
    import shutil

    from tunewise.phases import tracked
    from tunewise.runs import RunDir

    run_dir = sweep_dir / "trials" / f"trial{slot}"
    # Snakemake creates the output's (empty) folder before the job starts: only a killed attempt leaves files
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return {}
    previous = RunDir(run_dir).info()
    # the killed attempt's files stay for inspection, out of the way of the new trial
    archive = sweep_dir / "trials" / "interrupted" / f"trial{slot}-attempt{attempt}"
    archive.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(archive, ignore_errors=True)
    run_dir.rename(archive)
    if previous.get("mlflow_run_id"):
        # its trial is a failure in the study, so its MLflow run is no result either (even one that
        # finished training just before the kill, before the study was told)
        tracked.tracker(exp).supersede(previous["mlflow_run_id"], f"slot {slot} re-asked; files in {archive}",
                                       finished_too=True)
    return previous


def _train_slot(exp: dict, exp_dir: Path, study, setting: tuple, slot: int, threads: int | None,
                rule: str | None):
    """Ask the slot's trial (the point of a trial that did not end, else a new one), train and tell it."""
    from tunewise.trainers import budget, budget_key, get_trainer

    space, base, epochs, sweep_dir = setting
    stale = fail_stale(study, slot)
    attempt = len(slot_trials(study, slot))
    if attempt:  # a fresh sampler seed for a re-ask that samples: a point that failed is not proposed again
        study = open_study(exp, space, base, sweep_dir / "study.journal", slot, attempt, epochs=epochs)
    trainer = get_trainer(exp["trainer"])
    previous = archive_attempt(exp, sweep_dir, slot, attempt)
    if previous and trainer.knobs.get("batch_size") in space:
        # the sampler chooses the batch size: an OOM is that point's failure, not a reason to shrink another
        previous = {k: v for k, v in previous.items() if k not in ("batch_size", "out_of_memory")}
    again = retry_point(study, slot, trainer.knobs.get("batch_size"), space)
    trial = ask(study, slot, sweep_dir / "ask.lock", again)
    params = suggest(trial, space)
    if again is not None:
        print(f"slot {slot}: trial {again.number} did not end ({again.user_attrs.get('fail_kind', 'killed')}); "
              f"its point is trained again as trial {trial.number}")
    config = trial_config(base, params, epochs, budget_key(trainer))
    if stale:
        print(f"slot {slot}: trial(s) {stale} left running by a killed job recorded as failed; re-asked as trial {trial.number}")
    wrapper = lambda inner: TrialReporter(inner, trial, exp["metric"]["name"], budget(trainer, config))  # noqa: E731
    _train_trial(exp, exp_dir, study, trial, config, slot, sweep_dir / "trials" / f"trial{slot}", wrapper,
                 {k: v for k, v in previous.items() if k != "mlflow_run_id"}, threads, rule)
    return study


def _train_trial(exp, exp_dir, study, trial, config, slot, run_dir, wrapper, previous, threads, rule) -> None:
    """Train the asked trial through the training phase and tell the study how it ended."""
    from tunewise.phases.train import OutOfMemory, train_run

    try:
        metrics = train_run(
            exp, exp_dir, run_dir, config, phase="optimize", rule=rule, run_name=f"trial{slot}", threads=threads,
            parent="sweep", tags={"trial": trial.number, "slot": slot, "study": study.study_name},
            reporter_wrapper=wrapper,
            # an earlier attempt that ran out of memory makes this one's batch smaller (not its MLflow run's owner)
            previous_attempt=previous)
    except BaseException as e:
        kind = (INTERRUPTED if isinstance(e, KeyboardInterrupt)
                else "out_of_memory" if isinstance(e, OutOfMemory) else "error")
        tell_failed(study, trial, kind, f"{type(e).__name__}: {e}")
        raise
    if metrics["status"] == "done":
        tell(study, trial, float(metrics["primary"]["best"]))
    elif metrics["status"] == "pruned":
        trial.set_user_attr("reason", metrics["reason"])
        tell(study, trial, state=TrialState.PRUNED)
    else:
        tell_failed(study, trial, "diverged", metrics.get("reason") or metrics["status"])


def select_best(exp: dict, exp_dir: Path, out_dir: Path, *, rule: str | None = None) -> dict:
    """The best complete trial of the study -> best.yaml, best.json, sweep.json (with playbook checks); logged to
    the experiment's `sweep` parent run. Returns sweep.json's summary."""
    from tunewise.config import dump_yaml
    from tunewise.phases import CliError, tracked
    from tunewise.phases.playbook import sweep_checks
    from tunewise.runs import atomic_write_text, write_json

    space, base, epochs, sweep_dir = setup(exp, exp_dir)
    study = open_study(exp, space, base, sweep_dir / "study.journal", epochs=epochs)
    try:
        summary = summarise(study, exp, space, sweep_dir / "trials", int(exp["optimize"]["sweep"]["n_trials"]))
    except SweepError as e:
        raise CliError(str(e)) from None
    summary["checks"] = sweep_checks(summary)
    best = summary["best"]
    # the best trial's values on the base config; a shortened trial budget (optimize.sweep.epochs) is not kept
    config = trial_config(base, best["params"], None)
    out = Path(out_dir)
    atomic_write_text(out / "best.yaml", dump_yaml(config))
    write_json(out / "sweep.json", summary)
    write_json(out / "best.json", {"strategy": "sweep", "config": str(out / "best.yaml"), "run_dir": best["run_dir"],
                                   "value": best["value"], "metric": exp["metric"], "trial": best["number"],
                                   "slot": best["slot"], "params": best["params"], "study": study.study_name})
    tracker = tracked.tracker(exp)
    parent = tracked.parent_run(tracker, exp, exp_dir, "sweep")
    tracker.log_params(parent, {"sampler": summary["sampler"], "pruner": summary["pruner"], "n_trials": summary["n_trials"],
                                "study": study.study_name})
    tracker.log_metrics(parent, {"best_value": best["value"], **{f"n_{k.lower()}": v for k, v in summary["states"].items()},
                                 **{f"importance/{k}": v for k, v in summary["importance"].items()}})
    for path in (out / "best.yaml", out / "sweep.json"):
        tracker.log_artifact(parent, path)
    tracker.end_run(parent)
    print(f"sweep of {exp['name']}: best trial {best['number']} (slot {best['slot']}) {exp['metric']['name']} = {best['value']:.4g}; "
          + ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items()))
    return summary
