"""Phase 6 (trainers with a design phase): batched inverse design on the final model -> design.json, the
tables beside it and design_report.md, in one MLflow `design` run nested under the final run."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunewise.phases import CliError, tracked


def design_overrides(trainer, sets: list[str] | None) -> dict:
    """--set KEY=VALUE design settings (a `design.` prefix allowed), checked against the trainer's defaults."""
    from tunewise.config import ConfigError, parse_override

    overrides = {}
    for text in sets or []:
        key, value = parse_override(text)
        overrides[key.removeprefix("design.")] = value
    known = trainer.default_config()["design"]
    unknown = set(overrides) - set(known)
    if unknown:
        raise ConfigError(f"design --set: unknown design key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return overrides


def _log(exp: dict, result: dict, config: dict, final: dict, out: Path, reports: list, rule: str | None) -> None:
    """One `design` run nested under the final run; its id is kept so a rerun updates it, not a copy."""
    from tunewise.runs import RunDir, read_json, write_json

    tracker = tracked.tracker(exp)
    state = out / "mlflow_run.json"
    run_id = read_json(state)["run_id"] if state.exists() else None
    if run_id is None:
        parent = RunDir(Path(final["run_dir"])).info().get("mlflow_run_id") if final.get("run_dir") else None
        run_id = tracker.start_run("design", tracked.base_tags(exp, "design", rule, config), parent_id=parent)
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
    tracked.log_files(tracker, run_id, [out / "design.json", *result["files"].values(), *reports])
    tracker.end_run(run_id)


def design(exp: dict, final_path: Path, out_dir: Path, *, sets: list[str] | None = None,
           report: Callable[[dict], list] | None = None, threads: int | None = None, progress: bool = False,
           rule: str | None = None) -> dict:
    """Inverse design on the final model of final.json; `report(result)` writes design_report.md and returns
    its paths. Returns design.json's content."""
    from tunewise.config import load_yaml
    from tunewise.devices import resolve_device, set_threads
    from tunewise.runs import read_json
    from tunewise.trainers import get_trainer

    trainer = get_trainer(exp["trainer"])
    if not hasattr(trainer, "design"):
        raise CliError(f"design: the {exp['trainer']} trainer of {exp['name']!r} has no design phase")
    final = read_json(final_path)
    config = load_yaml(final["config_path"])
    overrides = design_overrides(trainer, sets)
    set_threads(threads)
    device = resolve_device(exp["device"])
    out = Path(out_dir)
    try:
        result = trainer.design(config, Path(final["checkpoints"]["best"]), device, out, overrides, progress=progress)
    except ValueError as e:
        raise CliError(f"design of {exp['name']}: {e}") from None
    result = {"experiment": exp["name"], "final": str(final_path), **result}
    reports = report(result) if report else []
    _log(exp, result, config, final, out, reports, rule)
    summary = result["summary"]
    best = result["restarts"][0] if result["restarts"] and result["restarts"][0]["ok"] else None
    print(f"design of {exp['name']}: {summary['ok']}/{summary['restarts']} designs passed the round trip"
          + (f"; best validated score {summary['validated_score']:.4g} (restart {best['restart']})" if best else "")
          + f" -> {out / 'design.json'}")
    return result
