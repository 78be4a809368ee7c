"""Seed 004's loop across optimization rounds: what a decision needs to know about the rounds before it, what
the next round starts from, and the loop's conclusion that Phase 5 finalizes.

Round 1 is the experiment's own folders (results/<exp>/diagnosis, optimize, seeds, significance). Round r >= 2
lives in results/<exp>/round<r>/ with the same layout and its own experiment.yaml: the experiment with the
round's starting config (the *incumbent*) as its baseline. A round diagnoses the incumbent's run, optimizes,
trains the optimized side's seeds and compares them with the incumbent's seeds (which it reads where they
are: nothing is trained twice). The incumbent moves only on a verified improvement (decision B), so the final
config always rests on verified rounds.
"""
from __future__ import annotations

import copy
import math
import time
from datetime import datetime
from pathlib import Path

from tunewise.phases.decision import CONTINUE, LADDER

LOOP_DIR = "loop"  # results/<exp>/loop/: loop.json and the final decision Phase 5 reads


def round_info(exp: dict) -> dict:
    """The experiment's `round` block: {} in round 1 (the experiment's own folders)."""
    return exp.get("round") or {}


def round_index(exp: dict) -> int:
    return int(round_info(exp).get("index", 1))


def base_dir(exp: dict, exp_dir: Path) -> Path:
    """results/<exp>/: the experiment's own folder, also from a later round's folder."""
    return Path(round_info(exp).get("base_dir") or exp_dir)


def round_dir(base: Path, index: int) -> Path:
    return Path(base) if index == 1 else Path(base) / f"round{index}"


def seed_dir(run_dirs: list[str], seed: int) -> str | None:
    """The run of `seed` among a side's seed runs (its folder is named seed<N>), else the first."""
    for d in run_dirs:
        if Path(d).name == f"seed{seed}":
            return d
    return run_dirs[0] if run_dirs else None


# --- what a decision needs: evidence for A, findings, the rounds before, the clock ---------------------------


def train_val_gap(run_dir: str | Path, primary: str, direction: str) -> float | None:
    """How far the run's train-side metric is ahead of its validation metric at the best step, relative to the
    latter (seed 004's "train-val gap"); None when the run logs no train-side counterpart."""
    from tunewise.phases.diagnose import train_counterpart, load_run

    history, metrics = load_run(run_dir)
    train = train_counterpart(primary)
    if train is None or train not in history or primary not in history or not len(history):
        return None
    best_step = metrics.get("best_step")
    rows = history[history["step"] == best_step] if "step" in history and best_step is not None else history.tail(1)
    if not len(rows):
        rows = history.tail(1)
    val, tr = float(rows[primary].iloc[-1]), float(rows[train].iloc[-1])
    if not (math.isfinite(val) and math.isfinite(tr)) or val == 0:
        return None
    ahead = tr - val if direction == "max" else val - tr
    return max(0.0, ahead) / abs(val)


def side_evidence(exp: dict, side: dict | None) -> dict | None:
    """Decision A's numbers for one side of a comparison: its seed spread and its own run's train-val gap."""
    if not side:
        return None
    mean, std = side.get("mean"), side.get("std")
    spread = None if std is None or not mean else float(std) / abs(float(mean))
    run = seed_dir(list(side.get("runs") or []), exp["seed"])
    metric = exp["metric"]
    gap = train_val_gap(run, metric["name"], metric["direction"]) if run else None
    return {"seed_std": spread, "train_val_gap": gap, "run_dir": run}


def run_findings(exp: dict, run_dir: str | Path | None) -> list[dict]:
    """The diagnosis of a finished run (generic and trainer rules, with the data checks), as Phase 3 makes it."""
    if not run_dir:
        return []
    from tunewise.phases.data import ready_path
    from tunewise.phases.diagnose import data_findings, load_run, thresholds_for, trainer_findings
    from tunewise.runs import read_json_if_exists
    from tunewise.trainers import get_spec

    trainer = get_spec(exp["trainer"])
    history, metrics = load_run(run_dir)
    findings = trainer_findings(trainer, history, metrics, exp["metric"], thresholds_for(trainer, exp) or {})
    ready = read_json_if_exists(ready_path(exp)) or {}
    return data_findings(ready.get("data_checks"), findings)


def earlier_gains(exp: dict) -> list[float]:
    """The relative gains of the rounds before this one that optimized (their significance.json)."""
    from tunewise.runs import read_json_if_exists

    base, gains = Path(round_info(exp).get("base_dir") or "."), []
    for k in range(1, round_index(exp)):
        sig = read_json_if_exists(round_dir(base, k) / "significance" / "significance.json") or {}
        if not sig.get("skipped") and sig.get("verdict"):
            gains.append(round_gain(sig))
    return gains


def round_gain(sig: dict) -> float:
    """A round's gain as the ceiling rule reads it: relative where defined, else the measured one."""
    rel = sig.get("improvement_rel")
    return float(rel if rel is not None else sig.get("improvement_measured", 0.0))


def minutes_since_start(base: Path) -> float | None:
    """Minutes since the experiment's baseline run started (finalize.time_budget counts from there)."""
    from tunewise.runs import read_json_if_exists

    info = read_json_if_exists(Path(base) / "baseline" / "run.json") or {}
    stamps = [e.get("started") for e in info.get("earlier", [])] + [info.get("started")]
    starts = []
    for s in stamps:
        try:
            starts.append(datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z").timestamp())
        except (TypeError, ValueError):
            continue
    return (time.time() - min(starts)) / 60.0 if starts else None


def possible_strategies(exp: dict, diagnosis: dict) -> set[str]:
    """The strategies a retry could run here: a sweep needs a space (the recommended knobs or the trainer's)."""
    from tunewise.trainers import get_spec

    possible = {"targeted", "iterative"}
    if recommended_space(diagnosis) or get_spec(exp["trainer"]).search_space():
        possible.add("sweep")
    return possible


def recommended_space(diagnosis: dict) -> dict:
    """A sweep space over the knobs the diagnosis recommended changing: each numeric change spans from half the
    smaller to twice the larger of its old and new values, log-scaled where both are positive. Non-negative
    values stay non-negative, and a fraction (a value in [0.05, 1]: dropout, momentum) stays below 1."""
    space = {}
    for change in diagnosis.get("changes") or []:
        old, new, key = change.get("old"), change.get("new"), change.get("key")
        numbers = [v for v in (old, new) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not key or len(numbers) != 2 or old == new:
            continue
        low, high = min(numbers), max(numbers)
        if all(isinstance(v, int) for v in numbers):
            space[key] = {"type": "int", "low": max(1, low // 2) if low > 0 else low, "high": max(high * 2, low + 1)}
        elif low >= 0:
            top = min(high * 2, (1 + high) / 2) if 0.05 <= high <= 1 else high * 2
            space[key] = {"type": "float", "low": low / 2, "high": top, **({"log": True} if low > 0 else {})}
        else:
            space[key] = {"type": "float", "low": low - abs(high - low), "high": high + abs(high - low)}
    return space


# --- the next round's experiment ----------------------------------------------------------------------------


def incumbent(exp: dict, exp_dir: Path, decision: dict) -> dict:
    """Where the round after this one starts: this round's optimized side after B, else this round's start."""
    from tunewise.runs import read_json

    if decision["next"] == "iterate":
        sig = read_json(Path(exp_dir) / "significance" / "significance.json")
        runs = list(sig["optimized"]["runs"])
        return {"round": round_index(exp), "side": "optimized", "seed_runs": runs,
                "run_dir": seed_dir(runs, exp["seed"])}
    return round_info(exp).get("incumbent") or _round1_baseline(exp_dir, exp)


def _round1_baseline(exp_dir: Path, exp: dict) -> dict:
    from tunewise.runs import read_json

    sig = read_json(Path(exp_dir) / "significance" / "significance.json")
    runs = list(sig["baseline"]["runs"])
    return {"round": 1, "side": "baseline", "seed_runs": runs, "run_dir": seed_dir(runs, exp["seed"])}


def next_experiment(exp: dict, exp_dir: Path, decision: dict) -> dict:
    """The experiment of the round after this one: the incumbent's config as its baseline, the strategy the
    decision names (C: the next rung; B: the one the experiment asked for), the round block."""
    from tunewise.config import load_yaml
    from tunewise.phases import CliError
    from tunewise.runs import read_json

    if decision.get("next") not in CONTINUE:
        raise CliError(f"the decision of round {round_index(exp)} ends the loop ({decision.get('option')}: "
                       f"{decision.get('next')}); there is no next round")
    exp_dir = Path(exp_dir)
    base = base_dir(exp, exp_dir)
    start = incumbent(exp, exp_dir, decision)
    nxt = copy.deepcopy(exp)
    nxt["baseline"] = load_yaml(Path(start["run_dir"]) / "config.yaml")
    requested = round_info(exp).get("requested_strategy") or exp["optimize"]["strategy"]
    if decision["next"] == "retry":
        strategy = decision["next_strategy"]
        nxt["optimize"]["strategy"] = strategy
        if strategy == "sweep":
            space = recommended_space(read_json(exp_dir / "diagnosis" / "diagnosis.json"))
            if space:  # the sweep searches around what the diagnosis recommended, and nothing else
                from tunewise.trainers import get_spec

                nxt["optimize"]["sweep"]["space"] = {
                    **{k: None for k in get_spec(exp["trainer"]).search_space()}, **space}
    else:
        nxt["optimize"]["strategy"] = requested
    k = round_index(exp) + 1
    nxt["round"] = {"index": k, "base_dir": str(base), "requested_strategy": requested, "incumbent": start,
                    "previous": {"round": k - 1, "option": decision["option"], "next": decision["next"],
                                 "rationale": decision["rationale"]}}
    return nxt


def write_next_experiment(exp: dict, exp_dir: Path, decision_path: Path, out: Path, rule: str | None = None) -> dict:
    from tunewise.config import dump_yaml
    from tunewise.runs import atomic_write_text, read_json

    nxt = next_experiment(exp, exp_dir, read_json(decision_path))
    expected = round_dir(base_dir(exp, Path(exp_dir)), nxt["round"]["index"]) / "experiment.yaml"
    if Path(out).resolve() != expected.resolve():
        from tunewise.phases import CliError

        raise CliError(f"--out {out}: round {nxt['round']['index']}'s experiment belongs at {expected}")
    atomic_write_text(Path(out), dump_yaml(nxt))
    if rule is not None:  # as a workflow job: on the experiment's `workflow` run, under round<r>/
        from tunewise.phases import tracked

        tracked.log_experiment_files(nxt, Path(out).parent, rule, {Path(out): None})
    print(f"round {nxt['round']['index']} of {exp['name']}: {nxt['optimize']['strategy']} from the "
          f"{nxt['round']['incumbent']['side']} config of round {nxt['round']['incumbent']['round']}")
    return nxt


# --- the loop's conclusion ----------------------------------------------------------------------------------


def _side_summary(side: dict | None) -> dict | None:
    if not side:
        return None
    return {k: side.get(k) for k in ("n", "mean", "std", "values")}


def round_record(exp: dict, folder: Path) -> dict:
    """One row of the rounds table: what the round started from, tried, measured and decided."""
    from tunewise.config import load_experiment
    from tunewise.runs import read_json

    folder = Path(folder)
    rexp = load_experiment(folder / "experiment.yaml")
    sig = read_json(folder / "significance" / "significance.json")
    dec = read_json(folder / "significance" / "decision.json")
    diag = read_json(folder / "diagnosis" / "diagnosis.json")
    start = round_info(rexp).get("incumbent") or {"round": 1, "side": "baseline"}
    return {
        "round": round_index(rexp), "dir": str(folder), "strategy": diag["strategy"]["chosen"],
        "strategy_reason": diag["strategy"]["reason"], "starts_from": {k: start[k] for k in ("round", "side")},
        "findings": [f["id"] for f in diag.get("findings", [])], "changes": len(diag.get("changes") or []),
        "baseline": _side_summary(sig.get("baseline")), "optimized": _side_summary(sig.get("optimized")),
        "skipped": bool(sig.get("skipped")), "verdict": sig.get("verdict"),
        "p_one_sided": sig.get("p_one_sided"), "gain": None if sig.get("skipped") else round_gain(sig),
        "decision": {k: dec.get(k) for k in ("option", "label", "next", "chosen_side", "rationale", "criteria",
                                             "target", "target_met", "next_strategy")},
        "seed_runs": {side: list((sig.get(side) or {}).get("runs") or []) for side in ("baseline", "optimized")},
        "started_from": start,
    }


def conclusion(exp: dict, records: list[dict]) -> dict:
    """The loop's final decision for Phase 5: the last round's decision, with the config it keeps made concrete
    (the run folder and config file, and which round verified it)."""
    last = records[-1]
    dec = last["decision"]
    if dec["chosen_side"] == "optimized":
        keeper, runs = {"round": last["round"], "side": "optimized"}, last["seed_runs"]["optimized"]
    else:
        keeper = last["started_from"]
        runs = last["seed_runs"]["baseline"]
    seed_run = seed_dir(runs, exp["seed"])
    by_round = {r["round"]: r for r in records}
    verified = by_round.get(keeper["round"]) if keeper["side"] == "optimized" else None
    original = keeper["side"] == "baseline" and keeper["round"] == 1
    return {
        **{k: dec.get(k) for k in ("option", "label", "next", "rationale", "criteria", "target", "target_met")},
        "chosen_side": "baseline" if original else "optimized",
        "config_round": keeper["round"], "config_side": keeper["side"],
        "config_path": str(Path(seed_run) / "config.yaml"), "seed_run": str(Path(seed_run) / "metrics.json"),
        "rounds": len(records),
        "verified_by": None if verified is None else {"round": verified["round"], "verdict": verified["verdict"],
                                                      "p_one_sided": verified["p_one_sided"], "gain": verified["gain"]},
    }


def conclude(exp: dict, exp_dir: Path, round_dirs: list[str], out_dir: Path, *, report=None,
             rule: str | None = None) -> dict:
    """loop.json (every round's record and the conclusion) and decision.json (the conclusion Phase 5 reads) in
    `out_dir`; `report(loop_json)` writes optimization_results.md and the rounds plot (returns their paths)."""
    from tunewise.phases import CliError, tracked
    from tunewise.runs import write_json

    folders = [Path(d) for d in round_dirs if d]
    if not folders:
        raise CliError("no round folders given (--rounds results/<exp> [results/<exp>/round2 ...])")
    records = [round_record(exp, f) for f in folders]
    for k, rec in enumerate(records, 1):
        if rec["round"] != k:
            raise CliError(f"{rec['dir']} is round {rec['round']}, given as round {k}: list the rounds in order")
    final = conclusion(exp, records)
    out = Path(out_dir)
    loop = {"experiment": exp["name"], "metric": exp["metric"], "rounds": records, "final": final,
            "max_iterations": exp["finalize"]["max_iterations"], "time_budget": exp["finalize"].get("time_budget")}
    write_json(out / "loop.json", loop)
    write_json(out / "decision.json", final)
    written = report(out / "loop.json") if report else []
    tracker = tracked.tracker(exp)
    parent = tracked.parent_run(tracker, exp, exp_dir, "loop", rule)
    tracker.log_metrics(parent, {"rounds": len(records)} | {f"round{r['round']}_gain": r["gain"] for r in records
                                                            if r["gain"] is not None})
    tracker.set_tags(parent, {"decision": final["option"], "config_round": str(final["config_round"]),
                              "rule": rule or ""})
    tracked.log_files(tracker, parent, [out / "loop.json", out / "decision.json", *written])
    tracker.end_run(parent)
    print(f"loop of {exp['name']}: {len(records)} round(s); decision {final['option']} ({final['label']}); "
          f"finalize the {final['config_side']} config of round {final['config_round']}")
    return loop
