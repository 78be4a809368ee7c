"""Phase 5: the final model. The chosen side's config is trained once more (or its seed run adopted), the
test split is touched once with its best checkpoint, and the final checkpoints, final.json and the final
report are written."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tunewise.phases import CliError, tracked

TEST_TABLES_DIR = "test"  # under final/: the tables evaluate_test writes (trainers' report sections read them)


def _final_training(exp: dict, exp_dir: Path, decision: dict, config_path: Path, run_dir: Path,
                    threads: int | None, rule: str | None) -> dict:
    """Train the final model through the training phase, like every other run; its finished metrics."""
    from tunewise.config import load_yaml
    from tunewise.phases.train import train_run
    from tunewise.runs import RunDir

    side = decision["chosen_side"]
    train_run(exp, exp_dir, run_dir, load_yaml(config_path), phase="final", side=side, rule=rule, run_name="final",
              threads=threads,
              # the kept config's run with the experiment's seed is this very training, already done
              reuse_from=decision.get("seed_run") or Path(exp_dir) / "seeds" / side / f"seed{exp['seed']}" / "metrics.json")
    metrics = RunDir(run_dir).require_finished()
    if metrics["status"] != "done":
        raise CliError(f"final training ended as {metrics['status']}: {metrics.get('reason')}")
    return metrics


def _test_tables(trainer, config: dict, checkpoint: Path, device, out: Path) -> tuple[dict, list[Path]]:
    """The test split's metrics, and the tables the trainer wrote beside them (a confusion matrix, the prompts
    found: files its report sections read) in `out/test/`, emptied first so a rerun leaves nothing stale."""
    tables_dir = out / TEST_TABLES_DIR
    shutil.rmtree(tables_dir, ignore_errors=True)
    tables_dir.mkdir(parents=True)
    test = trainer.evaluate_test(config, checkpoint, device, tables_dir)
    not_metrics = sorted(k for k, v in test.items() if not isinstance(v, (int, float)) or isinstance(v, bool))
    if not_metrics:
        raise CliError(f"evaluate_test of trainer {trainer.name!r} returned non-numbers {not_metrics}: tables "
                       f"belong in the folder it is given ({tables_dir})")
    return test, sorted(p for p in tables_dir.rglob("*") if p.is_file())


def _final_checkpoints(run, out: Path, side: str) -> dict[str, Path]:
    """best.pt and last.pt of the final run, named after the side that won (`best_model_baseline.pt` when the
    baseline config won); an earlier finalization's copies for the other side go, so the folder never holds
    the checkpoints of two different final models."""
    for which in ("best", "last"):
        for stale in out.glob(f"{which}_model_*.pt"):
            if stale.name != f"{which}_model_{side}.pt":
                stale.unlink()
    paths = {which: out / f"{which}_model_{side}.pt" for which in ("best", "last")}
    for which, path in paths.items():
        shutil.copyfile(run.checkpoints / f"{which}.pt", path)
    return paths


def finalize(exp: dict, exp_dir: Path, decision_path: Path, baseline_config: Path | None,
             optimized_config: Path | None, out_dir: Path, *, report: Callable[[Path], list] | None = None, threads: int | None = None,
             rule: str | None = None) -> dict:
    """Phase 5 for the decision in `decision_path` (the loop's conclusion names its config and seed run; a single
    round's decision.json picks between `baseline_config` and `optimized_config`): final.json (returned) and the
    files it names in `out_dir`;
    `report(final_json)` writes the final report and returns its paths, logged with the final MLflow run."""
    from tunewise.config import load_yaml
    from tunewise.devices import resolve_device, set_threads
    from tunewise.runs import RunDir, atomic_write_text, read_json, write_json
    from tunewise.trainers import get_trainer

    decision = read_json(decision_path)
    config_path = Path(decision.get("config_path")
                       or (optimized_config if decision["chosen_side"] == "optimized" else baseline_config))
    out = Path(out_dir)
    run = RunDir(out / "run")
    metrics = _final_training(exp, exp_dir, decision, config_path, run.path, threads, rule)
    set_threads(threads)
    trainer = get_trainer(exp["trainer"])
    config = load_yaml(config_path)
    # the test split is touched here, once, with the best checkpoint
    test, tables = _test_tables(trainer, config, run.checkpoints / "best.pt", resolve_device(exp["device"]), out)
    checkpoints = _final_checkpoints(run, out, decision["chosen_side"])
    atomic_write_text(out / "final_config.yaml", config_path.read_text(encoding="utf-8"))
    final = {
        "experiment": exp["name"],
        "trainer": exp["trainer"],
        "chosen_side": decision["chosen_side"],
        "decision": decision["option"],
        "config_round": decision.get("config_round", 1),
        "config_path": str(out / "final_config.yaml"),
        "run_dir": str(run.path),
        "val": {"best": metrics["primary"]["best"], "best_step": metrics["best_step"]},
        "test": test,
        "checkpoints": {which: str(path) for which, path in checkpoints.items()},
        "tables": str(out / TEST_TABLES_DIR),  # what evaluate_test wrote beside the metrics
    }
    write_json(out / "final.json", final)
    reports = report(out / "final.json") if report else []
    tracker = tracked.tracker(exp)
    run_id = run.info()["mlflow_run_id"]
    tracker.log_metrics(run_id, test)
    tracked.log_files(tracker, run_id, [out / "final.json", out / "final_config.yaml", *reports])
    for table in tables:  # under test/ in the run's artifacts, in the folders the trainer made
        folder = table.parent.relative_to(out).as_posix()
        tracker.log_artifact(run_id, table, folder)
    primary_test = exp["metric"]["name"].replace("val/", "test/", 1)
    print(f"finalized {exp['name']} with the {decision['chosen_side']} config: {primary_test} = {test.get(primary_test)}")
    return final
