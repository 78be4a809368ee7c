"""Phase 5: the final model. The chosen side's config is trained once more (or its seed run adopted), the
test split is touched once with its best checkpoint, and the final checkpoints, final.json and the final
report are written."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tunewise.phases import CliError, tracked


def _final_training(exp: dict, exp_dir: Path, decision: dict, config_path: Path, run_dir: Path,
                    threads: int | None, rule: str | None) -> dict:
    """Train the final model through the training phase, like every other run; its finished metrics."""
    from tunewise.config import load_yaml
    from tunewise.phases.train import train_run
    from tunewise.runs import RunDir

    side = decision["chosen_side"]
    train_run(exp, exp_dir, run_dir, load_yaml(config_path), phase="final", side=side, rule=rule, run_name="final",
              threads=threads,
              # the chosen side's run with the experiment's seed is this very training, already done
              reuse_from=Path(exp_dir) / "seeds" / side / f"seed{exp['seed']}" / "metrics.json")
    metrics = RunDir(run_dir).require_finished()
    if metrics["status"] != "done":
        raise CliError(f"final training ended as {metrics['status']}: {metrics.get('reason')}")
    return metrics


def _test_tables(test: dict, out: Path) -> tuple[dict | None, dict | None]:
    """A trainer's tables in evaluate_test's answer (a test confusion matrix, pez prompts) are files, not
    metrics: written beside final.json and taken out of `test`."""
    from tunewise.runs import write_json

    # a trainer may add its test confusion matrix; it is a table, not a metric
    confusion = test.pop("confusion", None)
    if confusion is not None:
        write_json(out / "confusion_test.json", confusion)
    prompts = test.pop("prompts", None)  # the pez trainer's per-target prompts on the test split
    if prompts is not None:
        write_json(out / "prompts_test.json", {"split": "test", "targets": prompts})
    return confusion, prompts


def finalize(exp: dict, exp_dir: Path, decision_path: Path, baseline_config: Path, optimized_config: Path,
             out_dir: Path, *, report: Callable[[Path], list] | None = None, threads: int | None = None,
             rule: str | None = None) -> dict:
    """Phase 5 for the decision in `decision_path`: final.json (returned) and the files it names in `out_dir`;
    `report(final_json)` writes the final report and returns its paths, logged with the final MLflow run."""
    from tunewise.config import load_yaml
    from tunewise.devices import resolve_device, set_threads
    from tunewise.runs import RunDir, atomic_write_text, read_json, write_json
    from tunewise.trainers import get_trainer

    decision = read_json(decision_path)
    config_path = Path(optimized_config if decision["chosen_side"] == "optimized" else baseline_config)
    out = Path(out_dir)
    run = RunDir(out / "run")
    metrics = _final_training(exp, exp_dir, decision, config_path, run.path, threads, rule)
    set_threads(threads)
    trainer = get_trainer(exp["trainer"])
    config = load_yaml(config_path)
    # the test split is touched here, once, with the best checkpoint
    test = trainer.evaluate_test(config, run.checkpoints / "best.pt", resolve_device(exp["device"]))
    confusion, prompts = _test_tables(test, out)
    shutil.copyfile(run.checkpoints / "best.pt", out / "best_model_optimized.pt")
    shutil.copyfile(run.checkpoints / "last.pt", out / "last_model_optimized.pt")
    atomic_write_text(out / "final_config.yaml", config_path.read_text(encoding="utf-8"))
    final = {
        "chosen_side": decision["chosen_side"],
        "decision": decision["option"],
        "config_path": str(out / "final_config.yaml"),
        "run_dir": str(run.path),
        "val": {"best": metrics["primary"]["best"], "best_step": metrics["best_step"]},
        "test": test,
        "checkpoints": {"best": str(out / "best_model_optimized.pt"), "last": str(out / "last_model_optimized.pt")},
        "confusion": str(out / "confusion_test.json") if confusion is not None else None,
        "prompts": str(out / "prompts_test.json") if prompts is not None else None,
    }
    write_json(out / "final.json", final)
    reports = report(out / "final.json") if report else []
    tracker = tracked.tracker(exp)
    run_id = run.info()["mlflow_run_id"]
    tracker.log_metrics(run_id, test)
    tracked.log_files(tracker, run_id, [out / "final.json", out / "final_config.yaml", *reports])
    primary_test = exp["metric"]["name"].replace("val/", "test/", 1)
    print(f"finalized {exp['name']} with the {decision['chosen_side']} config: {primary_test} = {test.get(primary_test)}")
    return final
