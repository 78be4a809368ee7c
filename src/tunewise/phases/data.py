"""The data phase: an experiment's prepared data (cached) and the preparation steps its trainer declares (a model
the data must train before any run, e.g.), each one job."""
from __future__ import annotations

from pathlib import Path

from tunewise.phases import CliError, tracked


def prepare_data(exp: dict, exp_dir: Path, out: Path, *, threads: int = 1, rule: str | None = None) -> dict:
    """Make the experiment's data ready (the trainer caches it), create the MLflow experiment and the seed runs'
    parent before parallel jobs start, and write `out` (ready.json). Returns what the trainer reported."""
    from tunewise.runs import write_json
    from tunewise.trainers import get_trainer

    trainer = get_trainer(exp["trainer"])
    try:
        # the trainer's own checks, some of which (a model built from its weights files) need torch
        # and so are not run at the Snakefile parse: still before any training
        trainer.check_config(exp["baseline"])
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"experiments.{exp['name']}: {e}") from None
    data_cfg = exp["baseline"]["data"]
    try:
        info = trainer.prepare_data(data_cfg, Path(data_cfg["prepared_dir"]), threads=threads)
    except ValueError as e:
        # the data loaders' errors name the key and the file: the message is the whole story, not a traceback
        raise CliError(f"data of experiment {exp['name']!r}: {e}") from None
    tracked.parent_run(tracked.tracker(exp), exp, exp_dir, "significance", rule)
    write_json(Path(out), {"experiment": exp["name"], "trainer": exp["trainer"], **info})
    print(f"data ready: {info.get('n_rows', '?')} rows -> {out}")
    return info


def ready_path(exp: dict) -> Path:
    """ready.json of the experiment's prepared data (a later optimization round reads its experiment's)."""
    return Path(exp["baseline"]["data"]["prepared_dir"]) / "ready.json"


def step_dir(exp: dict, step: str) -> Path:
    """Where a preparation step's files go: a folder of that name beside the prepared data, which is where the
    trainer reads them (the rule's --out is `step.json` in it)."""
    return Path(exp["baseline"]["data"]["prepared_dir"]) / step


def prepare_step(exp: dict, step: str, out: Path, *, threads: int | None = None, rule: str | None = None) -> dict | None:
    """One preparation step the experiment's trainer declares (`preparation_steps`), run into its folder and
    logged as an MLflow run named after it; `out` (step.json, written last) marks it done. Returns the
    trainer's answer, None when the files in place already fit (cached)."""
    from tunewise.devices import set_threads
    from tunewise.runs import write_json
    from tunewise.trainers import get_trainer
    from tunewise.trainers.base import capability

    trainer = get_trainer(exp["trainer"])
    declared = capability(trainer, "preparation_steps")(exp["baseline"])
    if step not in declared:
        raise CliError(f"prepare-step: experiment {exp['name']!r} has no preparation step {step!r} "
                       f"(its {exp['trainer']} trainer declares: {', '.join(declared) or 'none'})")
    out = Path(out)
    if out.resolve() != (step_dir(exp, step) / "step.json").resolve():
        raise CliError(f"prepare-step: --out must be {step_dir(exp, step) / 'step.json'} (where the trainer looks)")
    threads = set_threads(threads)
    try:
        result = capability(trainer, "prepare_step")(step, exp["baseline"], step_dir(exp, step), threads)
    except ValueError as e:
        raise CliError(f"experiments.{exp['name']}: preparation step {step!r}: {e}") from None
    if result is None:
        print(f"{step_dir(exp, step)}: step {step!r} is already done for these data and settings")
    else:
        tracker = tracked.tracker(exp)
        run_id = tracker.start_run(step, tracked.base_tags(exp, "data", rule))
        tracker.log_params(run_id, result.get("params") or {})
        tracker.log_metrics(run_id, result.get("metrics") or {})
        tracked.log_files(tracker, run_id, result.get("files") or [])
        tracker.end_run(run_id)
        print(f"{result.get('message') or f'step {step!r} done'} -> {step_dir(exp, step)}")
    write_json(out, {"experiment": exp["name"], "step": step, "description": declared[step],
                     "metrics": (result or {}).get("metrics")})
    return result
