"""Phase 4, strategy `iterative`: rounds of diagnose -> recommend -> train, one Snakemake job per round.

The chain is unrolled statically (round k waits for round k-1's round.json), so no checkpoint is needed: a
round after the chain stopped still runs as a job, records that it was skipped and trains nothing. Each round
judges a single run, so its decision is a screen that steers the chain; the multi-seed significance phase
verifies the best config (`best.yaml`) afterwards.

Files under `results/<exp>/optimize/iterative/`:
    round<k>/config.yaml   the config round k trains (k > 1; round 1 trains diagnosis/optimization_config.yaml)
    round<k>/run/          its run directory
    round<k>/round.json    what the round changed, measured and decided
    best.yaml, best.json   the best config so far (the baseline's, after a revert) and where it came from
    iterative.json         every round, for the report
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tunewise.phases.decision import LABELS, meets_target
from tunewise.runs import RunDir, atomic_write_text, finite_float, read_json, write_json

# train_fn(config_path, run_dir) trains one run directory (the CLI passes `tunewise train`'s logic)
TrainFn = Callable[[Path, Path], None]

NO_RECOMMENDATION_LABEL = "Nothing left to change"


# --- paths ------------------------------------------------------------------------------------------------


def iterative_dir(exp_dir: Path) -> Path:
    return Path(exp_dir) / "optimize" / "iterative"


def round_dir(exp_dir: Path, k: int) -> Path:
    return iterative_dir(exp_dir) / f"round{k}"


def round_path(exp_dir: Path, k: int) -> Path:
    return round_dir(exp_dir, k) / "round.json"


# --- numbers ----------------------------------------------------------------------------------------------


def gain(value: float | None, reference: float | None, direction: str) -> tuple[float | None, float | None]:
    """(gain, relative gain) of `value` over `reference`, positive when better in the metric's direction; the
    relative gain is None over a reference of 0, where no ratio means anything."""
    if value is None or reference is None:
        return None, None
    g = value - reference if direction == "max" else reference - value
    return g, (g / abs(reference) if reference != 0 else None)


def _gained(g: float | None, rel: float | None, reference: float | None) -> str:
    if g is None:
        return "no reference value"
    return f"{rel:+.2%} over {reference:.4g}" if rel is not None else f"{g:+.4g} over {reference:.4g}"


def _usable(record: dict) -> bool:
    """A record that can be the best so far: it trained, did not diverge, and has a value."""
    return record.get("status") == "trained" and record.get("run_status") != "diverged" and record.get("value") is not None


def best_record(records: list[dict], direction: str) -> dict | None:
    """The best usable record; on a tie the earliest (an equal value is no reason to move on from a config)."""
    best = None
    for record in records:
        if not _usable(record):
            continue
        if best is None or (gain(record["value"], best["value"], direction)[0] or 0) > 0:
            best = record
    return best


def _pointer(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {k: record.get(k) for k in ("round", "config", "run_dir", "value")}


def _where(record: dict) -> str:
    return "the baseline" if record["round"] == 0 else f"round {record['round']}"


# --- the stop rules ---------------------------------------------------------------------------------------


def _decision(option: str, proceed: bool, next_step: str, reason: str, label: str | None = None) -> dict:
    return {"option": option, "label": label or LABELS[option], "continue": proceed, "next": next_step,
            "reason": reason}


def decide_round(record: dict, prior: list[dict], direction: str, target: float | None, ceiling_gain: float,
                 max_iterations: int, next_patch_empty: bool = False) -> dict:
    """Round `record["round"]`'s decision from its single run, given the records before it.

    `prior` holds the baseline (round 0) and every earlier round. In order: a diverged or valueless run, or one
    worse than the best so far, stops and reverts to the best so far (C); the target met stops (A); a relative
    gain under `ceiling_gain` in this round and the one before stops at the ceiling (D); the last round, or no
    recommendation left for the next one, stops with the best config so far (B, finalize); otherwise iterate (B).
    """
    k = record["round"]
    value, previous_best = record.get("value"), record.get("previous_best")
    g, rel = record.get("gain"), record.get("gain_rel")
    best = best_record(prior, direction)
    keep = _where(best) if best else "the baseline"
    goal = f"the target {'>=' if direction == 'max' else '<='} {target:.4g}" if target is not None else None
    short = "no target was set" if goal is None else f"short of {goal}"

    if record.get("run_status") == "diverged" or value is None:
        what = (f"diverged ({record.get('run_reason') or 'non-finite loss'})" if record.get("run_status") == "diverged"
                else "ended without a value of the metric")
        return _decision("C", False, "revert", f"round {k} {what}, which counts as worse: revert to {keep}, the best "
                         f"so far.", label=f"Worse: revert to {keep}")
    if g is not None and g < 0:
        return _decision("C", False, "revert",
                         f"round {k} reached {value:.4g}, worse than the best so far "
                         f"({_gained(g, rel, previous_best)}): revert to {keep}.", label=f"Worse: revert to {keep}")
    if meets_target(value, target, direction):
        return _decision("A", False, "finalize", f"round {k} reached {value:.4g}, which meets {goal}: finalize.")
    before = next((r for r in reversed(prior) if r.get("round", 0) >= 1 and r.get("status") == "trained"), None)
    gained = _gained(g, rel, previous_best)
    if (rel is not None and rel < ceiling_gain and before is not None and before.get("gain_rel") is not None
            and before["gain_rel"] < ceiling_gain):
        return _decision("D", False, "accept_ceiling",
                         f"round {before['round']} gained {before['gain_rel']:+.2%} and round {k} {rel:+.2%}, both "
                         f"under {ceiling_gain * 100:g}%: accept the ceiling with the best config so far; {short}.")
    if k >= max_iterations:
        return _decision("B", False, "finalize",
                         f"round {k} reached {value:.4g} ({gained}), {short}, and no rounds are left "
                         f"(max_iterations {max_iterations}): finalize with the best config so far.")
    if next_patch_empty:
        return _decision("B", False, "finalize",
                         f"round {k} reached {value:.4g} ({gained}), {short}, but the diagnosis of its run "
                         f"leaves no recommendation to apply: finalize with the best config so far.",
                         label=NO_RECOMMENDATION_LABEL)
    return _decision("B", True, "iterate",
                     f"round {k} reached {value:.4g} ({gained}), {short}: iterate "
                     f"({max_iterations - k} round(s) left).")


# --- diagnosis of a run (the Phase 3 engine) -------------------------------------------------------------


def plan(exp: dict, run_dir: Path) -> tuple[list[dict], dict, list[dict]]:
    """(findings, patch, changes) for the config of `run_dir`: the Phase 3 diagnosis' own plan, so a round
    applies `optimize.overrides` as the diagnosis does."""
    from tunewise.phases import diagnose

    p = diagnose.plan(exp, run_dir)
    return p["findings"], p["patch"], p["changes"]


def _finding_ids(findings: list[dict]) -> list[dict]:
    return [{k: f.get(k) for k in ("id", "root_cause", "severity")} for f in findings]


# --- reading what earlier jobs wrote ----------------------------------------------------------------------


def baseline_record(exp: dict, exp_dir: Path) -> dict:
    """The baseline run as round 0: the reference round 1 is compared with."""
    exp_dir = Path(exp_dir)
    diag_path = exp_dir / "diagnosis" / "diagnosis.json"
    run_dir = exp_dir / "baseline"
    if diag_path.exists():
        run_dir = Path((read_json(diag_path).get("baseline") or {}).get("run_dir") or run_dir)
    metrics = RunDir(run_dir).require_finished()
    return {"round": 0, "status": "trained", "run_status": metrics.get("status"), "run_reason": metrics.get("reason"),
            "config": str(run_dir / "config.yaml"), "run_dir": str(run_dir),
            "value": finite_float((metrics.get("primary") or {}).get("best")), "gain": None, "gain_rel": None}


def read_rounds(exp_dir: Path, upto: int) -> list[dict]:
    records = []
    for j in range(1, upto + 1):
        path = round_path(exp_dir, j)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: round {j} must run before round {upto + 1}")
        records.append(read_json(path))
    return records


def _settings(exp: dict) -> dict:
    settings = {"max_iterations": 3, "ceiling_gain": 0.02}
    settings.update((exp.get("optimize") or {}).get("iterative") or {})
    return settings


# --- one round --------------------------------------------------------------------------------------------


def _write_config(path: Path, config: dict, k: int, source: dict, changes: list[dict]) -> None:
    from tunewise.config import commented_config

    body = commented_config(config, changes).split("\n", 1)[1]  # its first line names optimization_config.yaml
    header = (f"# round{k}/config.yaml: the config of {_where(source)} with round {k}'s recommendations applied "
              f"(iterative strategy)")
    atomic_write_text(path, header + "\n" + body)


def _prepare_run_dir(run_dir: Path, config: dict) -> None:
    """A run directory holding another config (round k-1 changed since) is cleared, so neither the resume
    from last.pt nor the "already finished" shortcut of `tunewise train` picks up a stale run."""
    run = RunDir(run_dir)
    if run.config_path.exists() and run.config() != config:
        shutil.rmtree(run_dir)


def _stopped_record(k: int, prior: list[dict]) -> dict:
    last = prior[-1]
    stopped_at = last.get("stopped_at") or last["round"]
    stopper = prior[stopped_at]["decision"]
    best = last.get("best")
    return {
        "round": k, "status": "skipped", "config": None, "run_dir": None, "run_status": None, "value": None,
        "previous_best": (best or {}).get("value"), "gain": None, "gain_rel": None, "changes": [], "findings": [],
        "source": None, "stopped_at": stopped_at,
        "decision": {"option": stopper["option"], "label": stopper["label"], "continue": False,
                     "next": stopper["next"],
                     "reason": f"skipped: chain stopped at round {stopped_at} ({stopper['reason']})"},
        "best": best,
    }


def _write_empty(out: Path, k: int, findings: list[dict], source: dict, best: dict | None) -> dict:
    """Round k trains nothing: the diagnosis of its source run recommends no change."""
    record = {
        "round": k, "status": "skipped", "config": None, "run_dir": None, "run_status": None, "value": None,
        "previous_best": best["value"] if best else None, "gain": None, "gain_rel": None,
        "changes": [], "findings": _finding_ids(findings), "source": _pointer(source), "stopped_at": k,
        "decision": _decision("B", False, "finalize",
                              f"skipped: the diagnosis of {_where(source)} leaves no recommendation to apply: "
                              f"finalize with the best config so far.", label=NO_RECOMMENDATION_LABEL),
        "best": _pointer(best),
    }
    write_json(out, record)
    return record


def run_round(exp: dict, exp_dir: Path, k: int, train_fn: TrainFn) -> dict:
    """Run round `k` (1-based) of the iterative strategy and write its round.json; returns the record."""
    exp_dir = Path(exp_dir)
    settings = _settings(exp)
    max_iterations = int(settings["max_iterations"])
    if not 1 <= k <= max_iterations:
        raise ValueError(f"round {k} is outside 1..{max_iterations} (optimize.iterative.max_iterations)")
    metric = exp["metric"]
    direction = metric["direction"]
    prior = [baseline_record(exp, exp_dir), *read_rounds(exp_dir, k - 1)]
    out = round_path(exp_dir, k)

    if k > 1 and not prior[-1]["decision"]["continue"]:
        record = _stopped_record(k, prior)
        write_json(out, record)
        return record

    from tunewise.config import load_yaml
    from tunewise.phases.recommend import apply_patch

    best_before = best_record(prior, direction)
    if k == 1:
        diag = read_json(exp_dir / "diagnosis" / "diagnosis.json")
        source = prior[0]
        config_path = exp_dir / "diagnosis" / "optimization_config.yaml"
        config = load_yaml(config_path)
        findings, changes = diag.get("findings") or [], diag.get("changes") or []
        if not diag.get("patch"):
            return _write_empty(out, k, findings, source, best_before)
    else:
        previous = prior[-1]
        # continue from round k-1 unless it fell behind the best so far (then from the best)
        behind = best_before is not None and (gain(previous.get("value"), best_before["value"], direction)[0] or 0) < 0
        source = best_before if behind or not _usable(previous) else previous
        findings, patch, changes = plan(exp, Path(source["run_dir"]))
        if not patch:
            return _write_empty(out, k, findings, source, best_before)
        config = apply_patch(load_yaml(source["config"]), patch)
        config_path = round_dir(exp_dir, k) / "config.yaml"
        _write_config(config_path, config, k, source, changes)

    run_dir = round_dir(exp_dir, k) / "run"
    _prepare_run_dir(run_dir, config)
    train_fn(config_path, run_dir)
    metrics = RunDir(run_dir).require_finished()
    value = finite_float((metrics.get("primary") or {}).get("best"))
    previous_best = best_before["value"] if best_before else None
    g, rel = gain(value, previous_best, direction)
    record = {
        "round": k, "status": "trained", "config": str(config_path), "run_dir": str(run_dir),
        "run_status": metrics.get("status"), "run_reason": metrics.get("reason"), "value": value,
        "previous_best": previous_best, "gain": g, "gain_rel": rel,
        "changes": changes, "findings": _finding_ids(findings), "source": _pointer(source),
    }
    target = (exp.get("finalize") or {}).get("target")
    ceiling = float(settings["ceiling_gain"])
    decision = decide_round(record, prior, direction, target, ceiling, max_iterations)
    if decision["continue"]:
        _, next_patch, _ = plan(exp, run_dir)
        if not next_patch:
            decision = decide_round(record, prior, direction, target, ceiling, max_iterations, next_patch_empty=True)
    record["decision"] = decision
    record["stopped_at"] = None if decision["continue"] else k
    record["best"] = _pointer(best_record([*prior, record], direction))
    write_json(out, record)
    return record


# --- the chain's result -----------------------------------------------------------------------------------


def write_summary(exp: dict, exp_dir: Path) -> dict:
    """best.yaml, best.json and iterative.json once every round (1..max_iterations) has written round.json.

    The best config is the best usable round's, or the baseline's when no round beat it (a revert)."""
    exp_dir = Path(exp_dir)
    settings = _settings(exp)
    max_iterations = int(settings["max_iterations"])
    metric = exp["metric"]
    baseline = baseline_record(exp, exp_dir)
    rounds = read_rounds(exp_dir, max_iterations)
    best = best_record([baseline, *rounds], metric["direction"]) or baseline
    stopper = next((r for r in rounds if not r["decision"]["continue"]), rounds[-1])
    out = iterative_dir(exp_dir)
    best_yaml = out / "best.yaml"
    text = Path(best["config"]).read_text(encoding="utf-8")
    atomic_write_text(best_yaml, f"# best.yaml: the best config of the iterative strategy ({_where(best)}, "
                                 f"{metric['name']} {best['value']})\n" + text)
    best_json = {
        "strategy": "iterative", "config": str(best_yaml), "run_dir": best["run_dir"], "value": best["value"],
        "metric": {"name": metric["name"], "direction": metric["direction"]},
        "round": best["round"], "source_config": best["config"], "reverted_to_baseline": best["round"] == 0,
        "rounds_trained": sum(r["status"] == "trained" for r in rounds),
        "stopped_at": stopper.get("stopped_at"),
        "decision": stopper["decision"],
    }
    summary = {
        "experiment": exp.get("name"), "metric": best_json["metric"],
        "target": (exp.get("finalize") or {}).get("target"),
        "max_iterations": max_iterations, "ceiling_gain": settings["ceiling_gain"],
        "baseline": baseline, "rounds": rounds, "best": best_json,
    }
    write_json(out / "iterative.json", summary)
    write_json(out / "best.json", best_json)  # last: its presence means the strategy finished
    return best_json


# --- the phase, as `tunewise iterate` runs it --------------------------------------------------------------


def _check_out(out: str | Path | None, expected: Path, what: str) -> None:
    from tunewise.phases import CliError

    if out and Path(out).resolve() != expected.resolve():
        raise CliError(f"--out {out}: {what} {expected}")


def iterate_round(exp: dict, exp_dir: Path, k: int, *, out: str | Path | None = None, threads: int | None = None,
                  rule: str | None = None) -> dict:
    """Round `k` with the training phase (MLflow, resume from last.pt, a diverged run recorded as such), its
    decision tagged on the round's MLflow run. Returns the round's record."""
    from tunewise.phases import CliError, tracked
    from tunewise.phases.train import train_run

    expected = round_path(exp_dir, k)
    _check_out(out, expected, f"round {k} writes")

    def train(config_path: Path, run_dir: Path) -> None:
        from tunewise.config import load_yaml

        train_run(exp, exp_dir, run_dir, load_yaml(config_path), phase="optimize", side="optimized", rule=rule,
                  run_name=f"optimize-iterative-round{k}", threads=threads, parent="iterative",
                  tags={"iterative.round": k})

    try:
        record = run_round(exp, exp_dir, k, train)
    except ValueError as e:
        raise CliError(str(e)) from None
    decision = record["decision"]
    run_id = RunDir(record["run_dir"]).info().get("mlflow_run_id") if record["status"] == "trained" else None
    if run_id:
        tracker = tracked.tracker(exp)
        tracker.set_tags(run_id, {"iterative.decision": decision["option"], "iterative.continue": decision["continue"]})
        tracker.log_metrics(run_id, {"iterative/gain": record["gain"], "iterative/gain_rel": record["gain_rel"]})
        tracker.log_artifact(run_id, expected)
    print(f"iterative round {k} of {exp['name']}: {record['status']}, value {record['value']}; "
          f"option {decision['option']} ({'continue' if decision['continue'] else 'stop'}): {decision['reason']}")
    return record


def finish_chain(exp: dict, exp_dir: Path, *, out: str | Path | None = None, rule: str | None = None) -> dict:
    """best.yaml, best.json, iterative.json after the last round (write_summary), logged to the experiment's
    `iterative` parent run. Returns best.json."""
    from tunewise.phases import tracked

    expected = iterative_dir(exp_dir) / "best.json"
    _check_out(out, expected, "the summary is written to")
    best = write_summary(exp, exp_dir)
    tracker = tracked.tracker(exp)
    parent = tracked.parent_run(tracker, exp, exp_dir, "iterative")
    tracker.log_metrics(parent, {"best_value": best["value"], "best_round": best["round"],
                                 "rounds_trained": best["rounds_trained"]})
    tracker.set_tags(parent, {"decision": best["decision"]["option"], "rule": rule or ""})
    for name in ("best.yaml", "iterative.json", "best.json"):
        tracker.log_artifact(parent, iterative_dir(exp_dir) / name)
    tracker.end_run(parent)
    where = "the baseline (no round beat it)" if best["round"] == 0 else f"round {best['round']}"
    print(f"iterative {exp['name']}: best {exp['metric']['name']} {best['value']} from {where} -> {expected}")
    return best
