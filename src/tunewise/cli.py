"""`tunewise <verb>`: the one entry point the Snakemake rules call.

Each verb also works by hand. Heavy imports (torch, mlflow, pandas) happen inside the
verbs so that `tunewise --help` and light verbs start fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("tunewise")


class CliError(RuntimeError):
    """An error whose message is the whole story (no traceback for the user)."""


# --- shared pieces --------------------------------------------------------------------------


def _experiment(args) -> dict:
    from tunewise.config import load_experiment

    return load_experiment(args.experiment_file)


def _exp_dir(args) -> Path:
    return Path(args.experiment_file).parent


def _tracker(exp: dict):
    from tunewise.tracking import Tracker

    return Tracker(exp["tracking"]["uri"], exp["name"])


def _base_tags(exp: dict, phase: str, rule: str | None, config: dict | None = None) -> dict:
    from tunewise.config import config_hash
    from tunewise.runs import git_sha

    tags = {"phase": phase, "trainer": exp["trainer"], "tunewise.experiment": exp["name"], "git_sha": git_sha()}
    if rule:
        tags["rule"] = rule
    if config is not None:
        tags["config_hash"] = config_hash(config)
    wildcards = os.environ.get("TUNEWISE_WILDCARDS")
    if wildcards:
        tags["wildcards"] = wildcards
    return tags


def _job_run(tracker, name: str, tags: dict, state: Path) -> str:
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


# --- verbs ----------------------------------------------------------------------------------


def cmd_validate(args) -> None:
    from tunewise.config import load_yaml, validate

    cfg = validate(load_yaml(args.config))
    print(f"{args.config}: valid ({', '.join(cfg['experiments'])})")


def cmd_resolve(args) -> None:
    from tunewise.config import dump_yaml, load_yaml, resolve_experiment, validate_schema
    from tunewise.runs import atomic_write_text

    raw = json.loads(args.config_json) if args.config_json else load_yaml(args.config)
    cfg = validate_schema(raw)
    if args.experiment not in cfg["experiments"]:
        raise CliError(f"experiment {args.experiment!r} not in config (have: {', '.join(cfg['experiments'])})")
    exp = resolve_experiment(cfg, args.experiment)
    out = Path(args.out)
    exp["baseline"]["data"]["prepared_dir"] = str(out.parent / "data")
    atomic_write_text(out, dump_yaml(exp))
    print(f"wrote {out}")


def cmd_prepare_data(args) -> None:
    from tunewise.runs import write_json
    from tunewise.trainers import get_trainer

    exp = _experiment(args)
    trainer = get_trainer(exp["trainer"])
    data_cfg = exp["baseline"]["data"]
    try:
        info = trainer.prepare_data(data_cfg, Path(data_cfg["prepared_dir"]), threads=args.threads)
    except ValueError as e:
        # the data loaders' errors name the key and the file: the message is the whole story, not a traceback
        raise CliError(f"data of experiment {exp['name']!r}: {e}") from None
    # the MLflow experiment and the seed runs' parent exist before parallel jobs start
    tracker = _tracker(exp)
    tracker.parent_run("significance", _base_tags(exp, "significance", args.rule), _exp_dir(args) / "tracking.json")
    write_json(Path(args.out), {"experiment": exp["name"], "trainer": exp["trainer"], **info})
    print(f"data ready: {info.get('n_rows', '?')} rows -> {args.out}")


def cmd_train_clip(args) -> None:
    """The embedded tiny CLIP of a pez experiment, trained on its prepared shapes (cached on the data)."""
    from tunewise.devices import set_threads
    from tunewise.runs import read_json
    from tunewise.trainers.pez.clip import train_tiny_clip
    from tunewise.trainers.base import data_root
    from tunewise.trainers.pez.trainer import tiny_clip_dir

    exp = _experiment(args)
    if exp["trainer"] != "pez":
        raise CliError(f"train-clip: experiment {exp['name']!r} uses the {exp['trainer']} trainer, not pez")
    config = exp["baseline"]
    out_dir = tiny_clip_dir(config)
    if out_dir is None:
        raise CliError(f"train-clip: experiments.{exp['name']}.data.clip names its own weights; nothing to train")
    out = Path(args.out)
    if out.resolve() != (out_dir / "clip_metrics.json").resolve():
        raise CliError(f"train-clip: --out must be {out_dir / 'clip_metrics.json'} (where the pez trainer looks)")
    data_dir = data_root(config)  # the shapes: generated into prepared_dir, or the user's data.path
    train = config["data"]["clip"]["train"]
    fingerprint = read_json(data_dir / "meta.json")["fingerprint"]
    if out.exists():
        old = read_json(out)
        if old.get("data_fingerprint") == fingerprint and all(old.get(k) == train[k] for k in train):
            print(f"{out}: the tiny CLIP for these data and settings is already trained")
            return
        out.unlink()  # clip_metrics.json is written last: without it the directory is incomplete
    threads = set_threads(args.threads)
    metrics = train_tiny_clip(data_dir, out_dir, epochs=int(train["epochs"]), batch_size=int(train["batch_size"]),
                              lr=float(train["lr"]), seed=int(train["seed"]), threads=threads)
    r = metrics["retrieval_val_test"]
    tracker = _tracker(exp)
    run_id = tracker.start_run("tiny-clip", _base_tags(exp, "data", args.rule))
    tracker.log_params(run_id, {"clip." + k: v for k, v in train.items()} | {"parameters": metrics["parameters"]})
    tracker.log_metrics(run_id, {f"clip/{k}": v for k, v in r.items()} | {"clip/train_seconds": metrics["train_seconds"],
                                                                          "clip/final_train_loss": metrics["final_train_loss"]})
    tracker.log_artifact(run_id, out)
    tracker.end_run(run_id)
    print(f"tiny CLIP: {metrics['parameters'] / 1e6:.1f}M parameters, {metrics['train_seconds']:.0f} s; held-out "
          f"image->caption top-1 {r['image_to_caption_top1']:.3f}, top-5 {r['image_to_caption_top5']:.3f} "
          f"({r['n_images']} images) -> {out}")


def _train_config(args, exp: dict) -> dict:
    from tunewise.config import load_yaml, parse_override, set_dotted

    if getattr(args, "config", None) is not None:
        return args.config
    config_file = args.config_file
    if not config_file and args.side == "optimized":
        config_file = _exp_dir(args) / "diagnosis" / "optimization_config.yaml"
    config = load_yaml(config_file) if config_file else exp["baseline"]
    for item in args.set or []:
        key, value = parse_override(item)
        set_dotted(config, key, value)
    return config


def cmd_train(args) -> None:
    from tunewise.devices import resolve_device, set_threads
    from tunewise.runs import RunDir
    from tunewise.trainers import budget, get_trainer
    from tunewise.trainers.base import NonFiniteLoss, Pruned
    from tunewise.tracking import EpochReporter

    exp = _experiment(args)
    config = _train_config(args, exp)
    seed = exp["seed"] if args.seed is None else args.seed
    trainer = get_trainer(exp["trainer"])
    threads = set_threads(args.threads)
    device = resolve_device(exp["device"])
    run = RunDir(args.run_dir)
    if run.is_finished() and not args.force:
        print(f"{run.path}: already finished (status {run.status}); --force to train again")
        return run.require_finished()
    # the previous start of this run (a sweep passes the one it set aside before re-asking the slot)
    previous = run.info() or getattr(args, "previous_attempt", None) or {}
    config, batch = _attempt_batch(trainer, config, previous)
    source = _reusable_run(getattr(args, "reuse_from", None), config, seed)
    # A start continues the previous one (what Snakemake's rerun of a killed job and a SLURM requeue do) only
    # when that one trained this very config and seed; otherwise its last.pt would mix two trainings.
    same = (not args.force and run.config_path.exists() and previous.get("seed") == seed
            and run.config() == config)
    if not same:
        run.clear()
    resuming = same and source is None and (run.checkpoints / "last.pt").exists()

    tracker = _tracker(exp)
    # one MLflow run per run directory, however many starts it takes; a killed attempt whose training is
    # not continued keeps its run, ended KILLED and tagged status=interrupted
    old_id = previous.get("mlflow_run_id")
    old_status = tracker.run_status(old_id) if old_id else None
    reuse = same and old_status is not None
    if old_status == "RUNNING" and not reuse:
        tracker.supersede(old_id, f"killed; {run.path} was started again with another config or from scratch")
    meta = {"phase": args.phase, "side": args.side, "experiment": exp["name"]}
    if batch is not None:
        meta["batch_size"] = batch
    info = run.start(config, seed, meta if reuse else {**meta, "mlflow_run_id": None})

    parent = None
    parent_name = getattr(args, "parent", None) or ("significance" if args.phase == "seed" else None)
    if parent_name:
        parent = tracker.parent_run(parent_name, _base_tags(exp, parent_name, None), _exp_dir(args) / "tracking.json")
    params = {"seed": seed, "threads": threads, "device": str(device), **config}
    if reuse:
        run_id = tracker.resume_run(old_id)
        tracker.log_params(run_id, params, only_new=True)  # a start killed before its params were all logged
    else:
        name = args.run_name or f"{args.phase}" + (f"-{args.side}-seed{seed}" if args.phase == "seed" else "")
        tags = _base_tags(exp, args.phase, args.rule, config) | {"seed": seed, "side": args.side, "run_dir": str(run.path)}
        tags |= getattr(args, "tags", None) or {}
        if batch is not None and batch["used"] != batch["configured"]:
            tags |= {"batch_size_configured": batch["configured"], "retry_of": old_id}
        run_id = tracker.start_run(name, tags, parent_id=parent)
        tracker.log_params(run_id, params)
        run.update_info(mlflow_run_id=run_id)
    if source is not None:
        return _adopt_run(source, run, tracker, run_id)
    if batch is not None and batch["used"] != batch["configured"]:
        print(f"{run.path}: {batch['key']}={batch['used']} instead of {batch['configured']}: an earlier start of "
              "this run ran out of memory")
    if resuming:
        print(f"{run.path}: resuming from checkpoints/last.pt")

    tracked = reporter = EpochReporter(tracker, run_id)
    if reuse:
        tracked.sync()  # metrics a killed start logged are not sent twice, even from a restart at epoch 1
    if getattr(args, "wrap_reporter", None):  # a sweep trial reports to Optuna too, and may be pruned
        reporter = args.wrap_reporter(reporter)
    try:
        metrics = trainer.run(config, seed, run, reporter, device, exp["metric"])
        tracked.flush()
    except (NonFiniteLoss, Pruned) as e:
        tracked.flush()
        # a diverged run is a finding for the diagnosis and a pruned trial an answer for the sweep,
        # not crashes of the workflow
        status = "pruned" if isinstance(e, Pruned) else "diverged"
        history = run.history() if run.history_path.exists() else None
        metrics = {
            "primary": {"name": exp["metric"]["name"], "direction": exp["metric"]["direction"], "best": None, "final": None},
            "best_step": 0,
            "epochs_run": 0 if history is None else int(len(history)),
            "epochs_planned": budget(trainer, config),
            "stopped_early": True,
            "device": str(device),
        }
        name = exp["metric"]["name"]
        if history is not None and name in history and history[name].notna().any():
            values = history[name]
            at = values.idxmax() if exp["metric"]["direction"] == "max" else values.idxmin()
            metrics["primary"]["best"] = float(values[at])
            metrics["primary"]["final"] = float(values.dropna().iloc[-1])
            metrics["best_step"] = int(history["step"][at])
        run.finish(metrics, status=status, reason=str(e))
        tracker.set_tags(run_id, {"status": status, "reason": str(e)})
        tracker.end_run(run_id, "KILLED" if status == "pruned" else "FAILED")
        print(f"{run.path}: {status} ({e})", file=sys.stderr)
        return metrics | {"status": status, "reason": str(e)}
    except (KeyboardInterrupt, SystemExit) as e:
        # No MLflow call here: the interrupt may have landed inside one, and the store's connection pool can
        # then block forever. The MLflow run stays RUNNING and is picked up again when the run resumes.
        run.fail(f"interrupted ({type(e).__name__})", status="interrupted")
        raise
    except Exception as e:
        from tunewise.train.oom import is_out_of_memory

        oom = is_out_of_memory(e)
        reason = _oom_reason(e, batch) if oom else f"{type(e).__name__}: {e}"
        run.update_info(status="failed", reason=reason, out_of_memory=oom)
        tracker.set_tags(run_id, {"status": "failed", "reason": reason[:5000]})
        tracker.end_run(run_id, "FAILED")
        if oom:  # the message is the whole story; Snakemake retries the job (resources.retries)
            raise OutOfMemory(f"{run.path}: {reason}") from None
        raise
    metrics["threads"] = threads
    run.finish(metrics)
    tracker.log_metrics(run_id, {f"best/{k}": v for k, v in metrics["best"].items() if k != "step"})
    tracker.log_artifact(run_id, run.config_path)
    tracker.log_artifact(run_id, run.history_path)
    tracker.log_artifact(run_id, run.metrics_path)
    tracker.end_run(run_id)
    p = metrics["primary"]
    print(f"{run.path}: done, {p['name']} best {p['best']:.4f} at step {metrics['best_step']} ({metrics['wall_seconds']:.1f}s)")
    return metrics | {"status": "done"}


class OutOfMemory(CliError):
    """Training ran out of memory; run.json records the batch size that did not fit."""


def _attempt_batch(trainer, config: dict, previous: dict) -> tuple[dict, dict | None]:
    """The config this start trains, with its batch size halved once per out-of-memory start of the same run
    (tunewise.train.oom), and the batch-size record for run.json: {key, configured, used}; None for a trainer
    without an integer batch_size knob."""
    import copy

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


def _oom_reason(error: BaseException, batch: dict | None) -> str:
    what = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
    if batch is None:
        return (f"out of memory ({what}); the trainer has no integer batch_size knob to make smaller, so a retry "
                "only gets more memory (mem_mb grows with the attempt)")
    key, used = batch["key"], batch["used"]
    if used <= 1:
        return f"out of memory at {key}={used} ({what}); there is no smaller batch to retry with"
    return (f"out of memory at {key}={used} ({what}): retrying with a smaller batch, {key}={used // 2}, from "
            "scratch (when Snakemake retries the job: resources.retries)")


def _reusable_run(metrics_path: str | None, config: dict, seed: int):
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


def _adopt_run(source, run, tracker, run_id: str) -> dict:
    """Make `run` a copy of the finished `source` run (checkpoints hard-linked) and give its MLflow run the
    same per-epoch history, so every consumer sees a complete run of its own."""
    import shutil

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
    history = run.history() if run.history_path.exists() else None
    if history is not None:  # what an adoption killed half-way already logged is not logged twice
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


def cmd_diagnose(args) -> None:
    from tunewise.config import dump_yaml
    from tunewise.phases.diagnose import choose_strategy, diagnose, load_run, thresholds_for
    from tunewise.phases.recommend import apply_patch, recommend, to_patch
    from tunewise.reports.render import commented_config, write_diagnostic_report
    from tunewise.runs import RunDir, atomic_write_text, write_json
    from tunewise.trainers import get_trainer

    exp = _experiment(args)
    trainer = get_trainer(exp["trainer"])
    run = RunDir(args.run_dir)
    run.require_finished()
    history, metrics = load_run(run.path)
    metric = exp["metric"]
    findings = diagnose(history, metrics, metric["name"], metric["direction"], thresholds_for(trainer, exp))
    config = run.config()
    recs = recommend(findings, config, trainer.knobs)
    patch, changes = to_patch(recs, config, trainer.knobs, top_n=exp["optimize"]["max_recommendations"])
    for key, value in (exp["optimize"].get("overrides") or {}).items():
        from tunewise.config import get_dotted

        changes.append({"knob": key, "key": key, "old": get_dotted(config, key), "new": value, "action": "set",
                        "rationale": "user override (optimize.overrides)", "expected_impact": "unknown",
                        "risk": "unknown", "effort": "low"})
        patch[key] = value
    best = metrics["primary"]["best"]
    strategy = choose_strategy(
        exp["optimize"]["strategy"], findings, best, exp["finalize"]["target"], metric["direction"],
        available={"targeted", "sweep", "iterative", "none"}, iterative_gap=exp["optimize"]["iterative"]["choose_gap"],
    )
    if exp["optimize"]["strategy"] == "auto" and strategy["chosen"] != "none" and not patch:
        strategy = {**strategy, "chosen": "none", "reason": strategy["reason"] + "; but no recommendation maps to a knob of this trainer, so nothing to change"}
    out = Path(args.out_dir)
    optimized = apply_patch(config, patch)
    atomic_write_text(out / "optimization_config.yaml", commented_config(optimized, changes))
    diagnosis = {
        "experiment": exp["name"],
        "trainer": exp["trainer"],
        "metric": metric,
        "baseline": {
            "run_dir": str(run.path),
            "status": metrics.get("status"),
            "best": best,
            "final": metrics["primary"].get("final"),
            "best_step": metrics.get("best_step"),
            "epochs_run": metrics.get("epochs_run"),
        },
        "findings": findings,
        "recommendations": recs,
        "changes": changes,
        "patch": patch,
        "strategy": strategy,
    }
    write_json(out / "diagnosis.json", diagnosis)
    reports = write_diagnostic_report(out / "diagnosis.json", run.path, Path(args.reports_dir))

    tracker = _tracker(exp)
    run_id = _job_run(tracker, "diagnose", _base_tags(exp, "diagnose", args.rule, config), out / "mlflow_run.json")
    tracker.log_params(run_id, {"strategy": strategy["chosen"], "n_findings": len(findings), "patch": json.dumps(patch)})
    tracker.log_metrics(run_id, {"n_findings": len(findings), "n_recommendations": len(recs)})
    for path in [out / "diagnosis.json", out / "optimization_config.yaml", *reports]:
        tracker.log_artifact(run_id, path, "reports" if path.suffix in (".md", ".png") else None)
    tracker.end_run(run_id)
    causes = sorted({f["root_cause"] for f in findings})
    print(f"diagnosis: {len(findings)} findings ({', '.join(causes) or 'none'}); strategy {strategy['chosen']}: {strategy['reason']}")


def _sweep_setup(args, exp: dict):
    """(space, base config, trial epochs, sweep dir) of an experiment's sweep."""
    from tunewise.config import load_yaml
    from tunewise.phases import sweep
    from tunewise.trainers import get_trainer

    cfg = exp["optimize"]["sweep"]
    exp_dir = _exp_dir(args)
    base_path = exp_dir / ("diagnosis/optimization_config.yaml" if cfg["base"] == "optimized" else "baseline/config.yaml")
    if not base_path.exists():
        raise CliError(f"{base_path}: the sweep's base config (optimize.sweep.base: {cfg['base']}) is missing; run the diagnosis first")
    try:
        space = sweep.resolve_space(get_trainer(exp["trainer"]).search_space(), cfg.get("space"))
    except sweep.SweepError as e:
        raise CliError(f"experiments.{exp['name']}.{e}") from None
    return space, load_yaml(base_path), cfg.get("epochs"), exp_dir / "optimize" / "sweep"


def cmd_sweep_trial(args) -> None:
    """One trial slot of the experiment's study: ask, train (reporting for pruning), tell."""
    import shutil

    from tunewise.phases import sweep
    from tunewise.runs import RunDir, write_json
    from tunewise.trainers import budget, budget_key, get_trainer

    exp = _experiment(args)
    space, base, epochs, sweep_dir = _sweep_setup(args, exp)
    slot, journal = args.slot, sweep_dir / "study.journal"
    run_dir = sweep_dir / "trials" / f"trial{slot}"
    study = sweep.open_study(exp, space, base, journal, slot, epochs=epochs)
    done = sweep.finished_trial(study, slot)
    if done is None:
        stale = sweep.fail_stale(study, slot)
        attempt = len(sweep.slot_trials(study, slot))
        if attempt:  # a fresh sampler seed for a re-ask that samples: a point that failed is not proposed again
            study = sweep.open_study(exp, space, base, journal, slot, attempt, epochs=epochs)
        trainer = get_trainer(exp["trainer"])
        previous = {}
        # Snakemake creates the output's (empty) folder before the job starts: only a killed attempt leaves files
        if run_dir.exists() and any(run_dir.iterdir()):
            previous = RunDir(run_dir).info()
            # the killed attempt's files stay for inspection, out of the way of the new trial
            archive = sweep_dir / "trials" / "interrupted" / f"trial{slot}-attempt{attempt}"
            archive.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(archive, ignore_errors=True)
            run_dir.rename(archive)
            if previous.get("mlflow_run_id"):
                # its trial is a failure in the study, so its MLflow run is no result either (even one that
                # finished training just before the kill, before the study was told)
                _tracker(exp).supersede(previous["mlflow_run_id"], f"slot {slot} re-asked; files in {archive}",
                                        finished_too=True)
            batch_key = trainer.knobs.get("batch_size")
            if batch_key in space:
                # the sampler chooses the batch size: an OOM is that point's failure, not a reason to shrink another
                previous = {k: v for k, v in previous.items() if k not in ("batch_size", "out_of_memory")}
        again = sweep.retry_point(study, slot, trainer.knobs.get("batch_size"), space)
        trial = sweep.ask(study, slot, sweep_dir / "ask.lock", again)
        params = sweep.suggest(trial, space)
        if again is not None:
            print(f"slot {slot}: trial {again.number} did not end ({again.user_attrs.get('fail_kind', 'killed')}); "
                  f"its point is trained again as trial {trial.number}")
        config = sweep.trial_config(base, params, epochs, budget_key(trainer))
        if stale:
            print(f"slot {slot}: trial(s) {stale} left running by a killed job recorded as failed; re-asked as trial {trial.number}")
        train_args = argparse.Namespace(
            experiment_file=args.experiment_file, run_dir=str(run_dir), config_file=None, seed=None, phase="optimize",
            side=None, threads=args.threads, set=None, rule=args.rule, run_name=f"trial{slot}", force=False,
            parent="sweep", tags={"trial": trial.number, "slot": slot, "study": study.study_name},
            wrap_reporter=lambda inner: sweep.TrialReporter(inner, trial, exp["metric"]["name"], budget(trainer, config)),
            config=config,
            # an earlier attempt that ran out of memory makes this one's batch smaller (not its MLflow run's owner)
            previous_attempt={k: v for k, v in previous.items() if k != "mlflow_run_id"},
        )
        try:
            metrics = cmd_train(train_args)
        except BaseException as e:
            kind = (sweep.INTERRUPTED if isinstance(e, KeyboardInterrupt)
                    else "out_of_memory" if isinstance(e, OutOfMemory) else "error")
            sweep.tell_failed(study, trial, kind, f"{type(e).__name__}: {e}")
            raise
        if metrics["status"] == "done":
            sweep.tell(study, trial, float(metrics["primary"]["best"]))
        elif metrics["status"] == "pruned":
            trial.set_user_attr("reason", metrics["reason"])
            sweep.tell(study, trial, state=sweep.TrialState.PRUNED)
        else:
            sweep.tell_failed(study, trial, "diverged", metrics.get("reason") or metrics["status"])
        done = sweep.finished_trial(study, slot)
    elif not RunDir(run_dir).is_finished():
        raise CliError(f"slot {slot} has finished trial {done.number} in {study.study_name} but {run_dir} is not a finished run")
    record = sweep.trial_record(done, run_dir)
    write_json(Path(args.out), {"study": study.study_name, **record})
    print(f"slot {slot}: trial {record['number']} {record['state']}, {exp['metric']['name']} = {record['value']}")


def cmd_select_best(args) -> None:
    """The best complete trial of the study -> best.yaml, best.json, sweep.json (with playbook checks)."""
    from tunewise.config import dump_yaml
    from tunewise.phases import sweep
    from tunewise.phases.playbook import sweep_checks
    from tunewise.runs import atomic_write_text, write_json

    exp = _experiment(args)
    space, base, epochs, sweep_dir = _sweep_setup(args, exp)
    study = sweep.open_study(exp, space, base, sweep_dir / "study.journal", epochs=epochs)
    try:
        summary = sweep.summarise(study, exp, space, sweep_dir / "trials", int(exp["optimize"]["sweep"]["n_trials"]))
    except sweep.SweepError as e:
        raise CliError(str(e)) from None
    summary["checks"] = sweep_checks(summary)
    best = summary["best"]
    # the best trial's values on the base config; a shortened trial budget (optimize.sweep.epochs) is not kept
    config = sweep.trial_config(base, best["params"], None)
    out = Path(args.out_dir)
    atomic_write_text(out / "best.yaml", dump_yaml(config))
    write_json(out / "sweep.json", summary)
    write_json(out / "best.json", {"strategy": "sweep", "config": str(out / "best.yaml"), "run_dir": best["run_dir"],
                                   "value": best["value"], "metric": exp["metric"], "trial": best["number"],
                                   "slot": best["slot"], "params": best["params"], "study": study.study_name})
    tracker = _tracker(exp)
    parent = tracker.parent_run("sweep", _base_tags(exp, "sweep", None), _exp_dir(args) / "tracking.json")
    tracker.log_params(parent, {"sampler": summary["sampler"], "pruner": summary["pruner"], "n_trials": summary["n_trials"],
                                "study": study.study_name})
    tracker.log_metrics(parent, {"best_value": best["value"], **{f"n_{k.lower()}": v for k, v in summary["states"].items()},
                                 **{f"importance/{k}": v for k, v in summary["importance"].items()}})
    for path in (out / "best.yaml", out / "sweep.json"):
        tracker.log_artifact(parent, path)
    tracker.end_run(parent)
    print(f"sweep of {exp['name']}: best trial {best['number']} (slot {best['slot']}) {exp['metric']['name']} = {best['value']:.4g}; "
          + ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items()))


def cmd_iterate(args) -> None:
    """One round of the iterative strategy (diagnose the previous round, apply, train), or with --summary
    the chain's best.yaml/best.json/iterative.json once every round has run."""
    from tunewise.phases import iterate
    from tunewise.runs import RunDir

    exp = _experiment(args)
    exp_dir = _exp_dir(args)
    tracker = _tracker(exp)
    tracking_state = exp_dir / "tracking.json"
    if args.summary:
        expected = iterate.iterative_dir(exp_dir) / "best.json"
        if args.out and Path(args.out).resolve() != expected.resolve():
            raise CliError(f"--out {args.out}: the summary is written to {expected}")
        best = iterate.write_summary(exp, exp_dir)
        parent = tracker.parent_run("iterative", _base_tags(exp, "iterative", None), tracking_state)
        tracker.log_metrics(parent, {"best_value": best["value"], "best_round": best["round"],
                                     "rounds_trained": best["rounds_trained"]})
        tracker.set_tags(parent, {"decision": best["decision"]["option"], "rule": args.rule or ""})
        for name in ("best.yaml", "iterative.json", "best.json"):
            tracker.log_artifact(parent, iterate.iterative_dir(exp_dir) / name)
        tracker.end_run(parent)
        where = "the baseline (no round beat it)" if best["round"] == 0 else f"round {best['round']}"
        print(f"iterative {exp['name']}: best {exp['metric']['name']} {best['value']} from {where} -> {expected}")
        return
    expected = iterate.round_path(exp_dir, args.round)
    if args.out and Path(args.out).resolve() != expected.resolve():
        raise CliError(f"--out {args.out}: round {args.round} writes {expected}")

    def train(config_path: Path, run_dir: Path) -> None:
        # the same verb as every run: MLflow, resume from last.pt, a diverged run recorded as such
        cmd_train(argparse.Namespace(
            experiment_file=args.experiment_file, run_dir=str(run_dir), config_file=str(config_path), seed=None,
            phase="optimize", side="optimized", threads=args.threads, set=None, rule=args.rule,
            run_name=f"optimize-iterative-round{args.round}", force=False, parent="iterative",
            tags={"iterative.round": args.round},
        ))

    try:
        record = iterate.run_round(exp, exp_dir, args.round, train)
    except ValueError as e:
        raise CliError(str(e)) from None
    decision = record["decision"]
    if record["status"] == "trained":
        run_id = RunDir(record["run_dir"]).info().get("mlflow_run_id")
        if run_id:
            tracker.set_tags(run_id, {"iterative.decision": decision["option"], "iterative.continue": decision["continue"]})
            tracker.log_metrics(run_id, {"iterative/gain": record["gain"], "iterative/gain_rel": record["gain_rel"]})
            tracker.log_artifact(run_id, expected)
    print(f"iterative round {args.round} of {exp['name']}: {record['status']}, value {record['value']}; "
          f"option {decision['option']} ({'continue' if decision['continue'] else 'stop'}): {decision['reason']}")


def _optimize_run(args, diag: dict) -> Path | None:
    """The run directory the chosen strategy stands on: the targeted run, or the run behind a sweep's or
    iterative chain's best.json (None when optimization was skipped)."""
    from tunewise.runs import read_json

    if getattr(args, "optimize_run", None):
        return Path(args.optimize_run)
    chosen = diag["strategy"]["chosen"]
    if chosen == "none":
        return None
    out = _exp_dir(args) / "optimize" / chosen
    best = out / "best.json"
    return Path(read_json(best)["run_dir"]) if best.exists() else out


def _primary_values(run_dirs: list[str], metric: str) -> tuple[list[float], list[str]]:
    from tunewise.runs import RunDir

    values = []
    for d in run_dirs:
        m = RunDir(d).require_finished()
        if m["status"] != "done" or m["primary"]["best"] is None:
            raise CliError(f"seed run {d} ended as {m['status']} ({m.get('reason')}); a failed seed cannot be dropped silently")
        values.append(float(m["primary"]["best"]))
    return values, list(run_dirs)


def cmd_significance(args) -> None:
    from tunewise.phases.decision import decide
    from tunewise.phases.significance import compare, summarise
    from tunewise.reports.render import write_optimization_results
    from tunewise.runs import read_json, write_json

    exp = _experiment(args)
    metric = exp["metric"]
    sig_cfg = exp["significance"]
    diag_path = Path(args.diagnosis)
    diag = read_json(diag_path)
    args.optimized_runs = [d for d in args.optimized_runs if d]  # Snakemake quotes an empty list as ''
    base_vals, base_runs = _primary_values([d for d in args.baseline_runs if d], metric["name"])
    out = Path(args.out_dir)
    if args.optimized_runs:
        opt_vals, opt_runs = _primary_values(args.optimized_runs, metric["name"])
        sig = compare(base_vals, opt_vals, metric["direction"], sig_cfg["alpha"], sig_cfg["min_improvement"],
                      sig_cfg["improvement"], n_boot=sig_cfg["n_boot"], seed=0)
        sig["baseline"]["runs"], sig["optimized"]["runs"] = base_runs, opt_runs
    else:
        sig = {"skipped": True, "reason": diag["strategy"]["reason"],
               "baseline": {**summarise(base_vals), "values": base_vals, "runs": base_runs}}
    sig.update({"metric": metric, "seeds": sig_cfg["seeds"], "mode": sig_cfg["improvement"],
                "alpha": sig_cfg["alpha"], "min_improvement": sig_cfg["min_improvement"]})
    decision = decide(
        None if sig.get("skipped") else sig,
        sig["baseline"]["mean"],
        metric["direction"],
        exp["finalize"]["target"],
        diag["strategy"]["chosen"],
        iterations_left=0,
    )
    decision["target"] = exp["finalize"]["target"]
    write_json(out / "significance.json", sig)
    write_json(out / "decision.json", decision)
    optimize_run = _optimize_run(args, diag)
    strategy_dir = _exp_dir(args) / "optimize" / diag["strategy"]["chosen"]
    extra = {}
    if (strategy_dir / "sweep.json").exists():
        extra["sweep_json"] = strategy_dir / "sweep.json"
    if (strategy_dir / "iterative.json").exists():
        extra["iterative_json"] = strategy_dir / "iterative.json"
    reports = write_optimization_results(out / "significance.json", out / "decision.json", diag_path,
                                         Path(diag["baseline"]["run_dir"]), optimize_run, Path(args.reports_dir), **extra)

    tracker = _tracker(exp)
    parent = tracker.parent_run("significance", _base_tags(exp, "significance", None), _exp_dir(args) / "tracking.json")
    numbers = {k: sig[k] for k in ("diff", "improvement", "improvement_rel", "p_one_sided", "p_two_sided", "hedges_g") if k in sig}
    if "ci" in sig:
        numbers |= {"ci_low": sig["ci"]["low"], "ci_high": sig["ci"]["high"]}
    numbers |= {"baseline_mean": sig["baseline"]["mean"], "baseline_std": sig["baseline"]["std"]}
    if "optimized" in sig:
        numbers |= {"optimized_mean": sig["optimized"]["mean"], "optimized_std": sig["optimized"]["std"]}
    tracker.log_metrics(parent, {k: v for k, v in numbers.items() if v is not None})
    tracker.set_tags(parent, {"verdict": sig.get("verdict", "skipped"), "decision": decision["option"], "rule": args.rule or ""})
    for path in [out / "significance.json", out / "decision.json", *reports]:
        tracker.log_artifact(parent, path, "reports" if path.suffix in (".md", ".png") else None)
    tracker.end_run(parent)
    print(f"significance: {sig.get('verdict', 'skipped')}; decision {decision['option']} ({decision['label']})")


def cmd_gate(args) -> None:
    from tunewise.phases import gates
    from tunewise.reports.render import write_checklist
    from tunewise.runs import write_json

    exp = _experiment(args)
    exp_dir, reports_dir = _exp_dir(args), Path(args.reports_dir)
    if args.name == "diagnostics":
        checks, title = gates.diagnostics_checks(exp_dir, reports_dir), "Phase 3 diagnostics complete"
    elif args.name == "optimization_complete":
        from tunewise.runs import read_json

        opt = _optimize_run(args, read_json(exp_dir / "diagnosis" / "diagnosis.json"))
        checks, title = gates.optimization_checks(exp_dir, reports_dir, opt), "Phase 4 optimization complete"
    else:
        raise CliError(f"unknown gate {args.name!r}")
    write_checklist(args.name, title, checks, reports_dir)
    ok, missing = gates.passed(checks)
    out = Path(args.out)
    if not ok and exp["gates"]["enforce"]:
        out.unlink(missing_ok=True)
        raise CliError(
            f"gate {args.name} of {exp['name']} failed: required box(es) unticked: "
            + "; ".join(missing) + f" (see {reports_dir / 'checklists' / (args.name + '.md')}; gates.enforce: false to proceed anyway)"
        )
    write_json(out, {"gate": args.name, "passed": ok, "enforced": exp["gates"]["enforce"], "checks": checks})
    print(f"gate {args.name}: {'passed' if ok else 'NOT passed (not enforced)'}")


def cmd_finalize(args) -> None:
    import shutil

    from tunewise.config import load_yaml
    from tunewise.reports.render import write_final_report
    from tunewise.runs import RunDir, atomic_write_text, read_json, write_json
    from tunewise.trainers import get_trainer
    from tunewise.devices import resolve_device, set_threads

    exp = _experiment(args)
    decision = read_json(args.decision)
    config_path = Path(args.optimized_config if decision["chosen_side"] == "optimized" else args.baseline_config)
    out = Path(args.out_dir)
    run_dir = out / "run"
    # train the final model through the same verb as every other run
    train_args = argparse.Namespace(
        experiment_file=args.experiment_file, run_dir=str(run_dir), config_file=str(config_path), seed=None,
        phase="final", side=decision["chosen_side"], threads=args.threads, set=None, rule=args.rule,
        run_name="final", force=False,
        # the chosen side's run with the experiment's seed is this very training, already done
        reuse_from=str(_exp_dir(args) / "seeds" / decision["chosen_side"] / f"seed{exp['seed']}" / "metrics.json"),
    )
    cmd_train(train_args)
    run = RunDir(run_dir)
    metrics = run.require_finished()
    if metrics["status"] != "done":
        raise CliError(f"final training ended as {metrics['status']}: {metrics.get('reason')}")
    set_threads(args.threads)
    trainer = get_trainer(exp["trainer"])
    device = resolve_device(exp["device"])
    config = load_yaml(config_path)
    # the test split is touched here, once, with the best checkpoint
    test = trainer.evaluate_test(config, run.checkpoints / "best.pt", device)
    # a trainer may add its test confusion matrix; it is a table, not a metric
    confusion = test.pop("confusion", None)
    if confusion is not None:
        write_json(out / "confusion_test.json", confusion)
    prompts = test.pop("prompts", None)  # the pez trainer's per-target prompts on the test split
    if prompts is not None:
        write_json(out / "prompts_test.json", {"split": "test", "targets": prompts})
    shutil.copyfile(run.checkpoints / "best.pt", out / "best_model_optimized.pt")
    shutil.copyfile(run.checkpoints / "last.pt", out / "last_model_optimized.pt")
    atomic_write_text(out / "final_config.yaml", config_path.read_text(encoding="utf-8"))
    final = {
        "chosen_side": decision["chosen_side"],
        "decision": decision["option"],
        "config_path": str(out / "final_config.yaml"),
        "run_dir": str(run_dir),
        "val": {"best": metrics["primary"]["best"], "best_step": metrics["best_step"]},
        "test": test,
        "checkpoints": {"best": str(out / "best_model_optimized.pt"), "last": str(out / "last_model_optimized.pt")},
        "confusion": str(out / "confusion_test.json") if confusion is not None else None,
        "prompts": str(out / "prompts_test.json") if prompts is not None else None,
    }
    write_json(out / "final.json", final)
    reports = write_final_report(out / "final.json", Path(args.decision), Path(args.reports_dir))
    tracker = _tracker(exp)
    run_id = RunDir(run_dir).info()["mlflow_run_id"]
    tracker.log_metrics(run_id, test)
    for path in [out / "final.json", out / "final_config.yaml", *reports]:
        tracker.log_artifact(run_id, path, "reports" if path.suffix in (".md", ".png") else None)
    primary_test = exp["metric"]["name"].replace("val/", "test/", 1)
    print(f"finalized {exp['name']} with the {decision['chosen_side']} config: {primary_test} = {test.get(primary_test)}")


def cmd_design(args) -> None:
    """Inverse design on the final model (latent trainer): design.json, the CSVs beside it, design_report.md."""
    from tunewise.config import ConfigError, load_yaml, parse_override
    from tunewise.devices import resolve_device, set_threads
    from tunewise.reports.design import write_design_report
    from tunewise.runs import RunDir, read_json, write_json
    from tunewise.trainers import get_trainer

    exp = _experiment(args)
    trainer = get_trainer(exp["trainer"])
    if not hasattr(trainer, "design"):
        raise CliError(f"design: the {exp['trainer']} trainer of {exp['name']!r} has no design phase")
    final = read_json(args.final)
    config = load_yaml(final["config_path"])
    overrides = {}
    for text in args.set or []:
        key, value = parse_override(text)
        overrides[key.removeprefix("design.")] = value
    known = trainer.default_config()["design"]
    unknown = set(overrides) - set(known)
    if unknown:
        raise ConfigError(f"design --set: unknown design key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    set_threads(args.threads)
    device = resolve_device(exp["device"])
    out = Path(args.out_dir)
    try:
        result = trainer.design(config, Path(final["checkpoints"]["best"]), device, out, overrides,
                                progress=args.progress)
    except ValueError as e:
        raise CliError(f"design of {exp['name']}: {e}") from None
    result = {"experiment": exp["name"], "final": str(args.final), **result}
    reports = write_design_report(result, Path(args.reports_dir))

    # MLflow: one `design` run nested under the final run; its id is kept so a rerun updates it, not a copy
    tracker = _tracker(exp)
    state = out / "mlflow_run.json"
    run_id = read_json(state)["run_id"] if state.exists() else None
    if run_id is None:
        parent = RunDir(Path(final["run_dir"])).info().get("mlflow_run_id") if final.get("run_dir") else None
        run_id = tracker.start_run("design", _base_tags(exp, "design", args.rule, config), parent_id=parent)
        write_json(state, {"run_id": run_id})
    else:
        tracker.resume_run(run_id)
    tracker.log_params(run_id, {"design": result["settings"]})
    summary = result["summary"]
    tracker.log_metrics(run_id, {f"design/{k}": v for k, v in summary.items()})
    for row in result["alpha_study"]:
        tracker.log_metrics(run_id, {f"design/alpha_{row['alpha']:g}/{k}": row[k]
                                     for k in ("off_manifold_rate", "validated_score", "best_score")})
    write_json(out / "design.json", result)  # last: its presence means the design is complete
    for path in [out / "design.json", *result["files"].values(), *reports]:
        tracker.log_artifact(run_id, path, "reports" if Path(path).suffix in (".md", ".png") else None)
    tracker.end_run(run_id)
    best = result["restarts"][0] if result["restarts"] and result["restarts"][0]["ok"] else None
    print(f"design of {exp['name']}: {summary['ok']}/{summary['restarts']} designs passed the round trip"
          + (f"; best validated score {summary['validated_score']:.4g} (restart {best['restart']})" if best else "")
          + f" -> {out / 'design.json'}")


def cmd_gpu_slot(args) -> None:
    """Run any command in the GPU slot(s) main() claimed: it replaces this process and keeps the locks,
    so the slot is free again exactly when the command ends (for rules of your own that use a GPU)."""
    from tunewise.devices import keep_slots_across_exec

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("no command given (tunewise gpu-slot --gpus N -- COMMAND ...)")
    keep_slots_across_exec()
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise CliError(f"cannot run {command[0]!r}: {e.strerror}") from None


def cmd_report_index(args) -> None:
    from tunewise.reports.render import write_index

    path = write_index(Path(args.results_dir), Path(args.reports_dir))
    print(f"wrote {path}")


# --- argument parsing -----------------------------------------------------------------------


def _gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs Snakemake gave this job ({resources.gpu}): lock N free GPU slots of this host and set "
                        "CUDA_VISIBLE_DEVICES to them before torch loads (nothing for 0, or under SLURM)")


def _common(p: argparse.ArgumentParser, experiment: bool = True) -> None:
    if experiment:
        p.add_argument("--experiment-file", required=True, help="results/<exp>/experiment.yaml (from `tunewise resolve`)")
    p.add_argument("--rule", default=None, help="Snakemake rule name, recorded as an MLflow tag")


def build_parser() -> argparse.ArgumentParser:
    from tunewise import __version__

    parser = argparse.ArgumentParser(prog="tunewise", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunewise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("validate", help="validate a config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("resolve", help="write one experiment's fully resolved config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config YAML")
    src.add_argument("--config-json", help="the workflow config as JSON (used by the Snakefile)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("prepare-data", help="make the experiment's data ready (cached)")
    _common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train-clip", help="train a pez experiment's embedded tiny CLIP on its prepared data")
    _common(p)
    p.add_argument("--out", required=True, help="results/<exp>/data/clip/clip_metrics.json")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train_clip)

    p = sub.add_parser("train", help="train one run into a run directory (resumes from last.pt)")
    _common(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config-file", help="full trainer config (default: the experiment's baseline)")
    p.add_argument("--seed", type=int)
    p.add_argument("--phase", default="baseline", choices=["baseline", "optimize", "seed", "final"])
    p.add_argument("--side", default=None, choices=[None, "baseline", "optimized"])
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. optim.lr=0.01")
    p.add_argument("--run-name")
    p.add_argument("--force", action="store_true")
    p.add_argument("--reuse-from", default=None,
                   help="metrics.json of a finished run; adopted instead of training when it has the same config and seed")
    _gpus(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("diagnose", help="Phase 3: findings, recommendations, config patch, strategy")
    _common(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("sweep-trial", help="Phase 4 sweep: ask the study for one trial slot, train it, tell")
    _common(p)
    p.add_argument("--slot", type=int, required=True, help="trial slot (the Snakemake wildcard `trial`)")
    p.add_argument("--out", required=True, help="trial.json, written once the trial is told")
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_sweep_trial)

    p = sub.add_parser("select-best", help="Phase 4 sweep: best trial -> best.yaml, sweep.json, playbook checks")
    _common(p)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_select_best)

    p = sub.add_parser("iterate", help="Phase 4 iterative: one round of diagnose -> recommend -> train")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, help="round number K (1..optimize.iterative.max_iterations)")
    which.add_argument("--summary", action="store_true", help="best.yaml, best.json, iterative.json after the last round")
    p.add_argument("--out", help="round<K>/round.json (or best.json with --summary); checked against the layout")
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("significance", help="multi-seed comparison and the decision point")
    _common(p)
    p.add_argument("--diagnosis", required=True)
    p.add_argument("--baseline-runs", nargs="+", required=True)
    p.add_argument("--optimized-runs", nargs="*", default=[])
    p.add_argument("--optimize-run")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_significance)

    p = sub.add_parser("gate", help="render a checklist from checks; fail on an unticked required box")
    _common(p)
    p.add_argument("--name", required=True, choices=["diagnostics", "optimization_complete"])
    p.add_argument("--optimize-run")
    p.add_argument("--out", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("finalize", help="Phase 5: final training, test split once, final checkpoints")
    _common(p)
    p.add_argument("--decision", required=True)
    p.add_argument("--baseline-config", required=True)
    p.add_argument("--optimized-config", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("design", help="Phase 6 (latent): batched inverse design on the final model, design_report.md")
    _common(p)
    p.add_argument("--final", required=True, help="results/<exp>/final/final.json")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a design setting for this run, e.g. restarts=200 or alpha=0 (YAML value)")
    p.add_argument("--progress", action="store_true", help="a progress bar over the design steps")
    _gpus(p)
    p.set_defaults(func=cmd_design)

    p = sub.add_parser("gpu-slot", help="run a command in a free GPU slot of this host (CUDA_VISIBLE_DEVICES set)")
    _gpus(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    p.set_defaults(func=cmd_gpu_slot, gpus=1)

    p = sub.add_parser("report-index", help="reports/index.md across experiments")
    _common(p, experiment=False)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--reports-dir", default="reports")
    p.set_defaults(func=cmd_report_index)
    return parser


def _claim_gpu_slots(args) -> None:
    """Before any verb imports torch: CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises."""
    if getattr(args, "gpus", None) is None:
        return
    from tunewise import devices

    claimed = devices.claim_gpus(args.gpus)
    if claimed:
        print(f"tunewise {args.verb}: GPU slot(s) {','.join(claimed)} (CUDA_VISIBLE_DEVICES)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tunewise.config import ConfigError
    from tunewise.devices import GpuSlotError
    from tunewise.runs import CheckpointError
    from tunewise.tracking import TrackingError

    try:
        _claim_gpu_slots(args)
        args.func(args)
    except (CliError, ConfigError, FileNotFoundError, GpuSlotError, TrackingError, CheckpointError) as e:
        print(f"tunewise {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
