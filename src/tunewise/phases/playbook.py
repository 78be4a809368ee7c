"""Google tuning playbook checks after a sweep, read from `sweep.json` alone.

reference/methods.md, "After a sweep": the best trial near a search-space boundary -> widen the range;
many diverged trials -> reparameterise; too few trials for the spread. Added from the diagnosis rules: the
best trial's best step early or late in its training, and the pruned share (informational).

A check is `{id, ok, severity, summary, evidence, action}`. `ok` is True (passes), False (fires) or None
(cannot be computed from the file, with the summary saying why): a check never passes for lack of data.
Every check carries its numbers in `evidence`, because the sweep report quotes them.
"""
from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping
from typing import Any

from tunewise.runs import finite_float

DEFAULT_THRESHOLDS: dict = {
    # best value within this share of a parameter's range from either end (log space for log parameters)
    "boundary_frac": 0.1,
    # failed + diverged trials above this share of all recorded trials call for a reparameterisation
    "max_failed_share": 0.2,
    # density: at least this many complete trials per swept parameter ...
    "min_complete_per_param": 2,
    # ... and never fewer than this many overall (fewer values cannot estimate a spread)
    "min_complete": 4,
    # resolution: the best must stand at least this many robust standard deviations above the median
    # complete value (see _spread_check for why)
    "min_best_z": 1.0,
    # best step within this leading share of the planned epochs: training longer than needed
    "early_frac": 0.1,
    # best step within this trailing share of the planned epochs: still improving, train longer
    "late_frac": 0.25,
}

# a trial that stopped on NaN/inf: NonFiniteLoss says "non-finite loss nan at step 3"
_NON_FINITE = re.compile(r"non-?finite|\bnan\b|\binf\b|diverg", re.IGNORECASE)
# 1.4826 * MAD estimates the standard deviation of normal data while ignoring a few wild trials
MAD_TO_STD = 1.4826


def _float(value: Any) -> float | None:
    """A float for numbers and the "inf"/"nan" strings runs.write_json leaves; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _num(value: Any) -> str:
    """A parameter value as a summary shows it: 4 significant digits, words as they are."""
    number = _float(value)
    return f"{number:.4g}" if number is not None and not isinstance(value, str) else str(value)


def _check(id: str, ok: bool | None, severity: str, summary: str, evidence: dict, action: str | None = None) -> dict:
    return {"id": id, "ok": ok, "severity": severity, "summary": summary, "evidence": evidence,
            "action": action if ok is False else None}


def _direction(sweep: Mapping) -> str:
    return (sweep.get("metric") or {}).get("direction", "max")


def _complete_values(sweep: Mapping) -> list[float]:
    return [v for t in sweep.get("trials") or [] if t.get("state") == "COMPLETE"
            for v in [finite_float(t.get("value"))] if v is not None]


def best_trial(sweep: Mapping) -> dict | None:
    """The trial record of sweep["best"] (matched by slot, then Optuna number), else the best complete trial."""
    trials = list(sweep.get("trials") or [])
    best = sweep.get("best") or {}
    for key in ("slot", "number"):
        if best.get(key) is not None:
            for trial in trials:
                if trial.get(key) == best[key]:
                    return trial
    complete = [t for t in trials if t.get("state") == "COMPLETE" and finite_float(t.get("value")) is not None]
    if not complete:
        return None
    sign = 1 if _direction(sweep) == "max" else -1
    return max(complete, key=lambda t: sign * finite_float(t["value"]))


def is_diverged(trial: Mapping) -> bool:
    """Stopped on a non-finite loss or metric: named in the reason, or a finished trial with a NaN/inf value."""
    if _NON_FINITE.search(str(trial.get("reason") or "")):
        return True
    value = _float(trial.get("value"))
    return trial.get("state") == "COMPLETE" and value is not None and not math.isfinite(value)


# --- the checks ---------------------------------------------------------------------------------------------


def _position(value: float, low: float, high: float, log: bool) -> float | None:
    """Where `value` sits in [low, high], 0..1, measured in log space for a log parameter."""
    if log:
        if low <= 0 or high <= 0 or value <= 0:
            return None
        value, low, high = math.log(value), math.log(low), math.log(high)
    if high <= low:
        return None
    return (value - low) / (high - low)


def _ordered_numeric(choices: list) -> bool:
    numbers = [_float(c) for c in choices]
    if len(choices) < 2 or any(n is None for n in numbers) or any(isinstance(c, (bool, str)) for c in choices):
        return False
    return numbers == sorted(numbers) or numbers == sorted(numbers, reverse=True)


def _boundary_check(key: str, spec: Mapping, best: Mapping | None, frac: float) -> dict:
    id_ = f"boundary:{key}"
    kind = spec.get("type", "float")
    value = (best or {}).get("params", {}).get(key) if best else None
    if best is None:
        return _check(id_, None, "medium", f"{key}: no complete trial, so no best value to place in the range.",
                      {"margin": frac})
    if value is None:
        return _check(id_, None, "medium", f"{key}: the best trial has no value for this parameter.", {"margin": frac})

    if kind == "categorical":
        choices = list(spec.get("choices") or [])
        evidence = {"best": value, "choices": choices, "n_choices": len(choices)}
        if not _ordered_numeric(choices):
            return _check(id_, None, "low", f"{key}: categorical choices without a numeric order have no boundary.",
                          evidence)
        index = choices.index(value) if value in choices else None
        if index is None:
            return _check(id_, None, "medium", f"{key}: the best value {_num(value)} is not among the choices.", evidence)
        evidence["index"] = index
        # an ordered list runs low -> high or high -> low: the side is the numerically smaller/larger end
        at_end = index in (0, len(choices) - 1)
        side = "low" if _float(value) == min(_float(c) for c in choices) else "high"
        if at_end:
            return _check(id_, False, "medium",
                          f"{key}: the best trial uses the {'first' if index == 0 else 'last'} choice {value} of the "
                          f"ordered choices {choices}, so better values may lie beyond it.",
                          evidence, f"widen the range of {key} towards {side}")
        return _check(id_, True, "medium", f"{key}: the best choice {value} is inside the ordered choices {choices}.",
                      evidence)

    low, high, log = _float(spec.get("low")), _float(spec.get("high")), bool(spec.get("log"))
    number = _float(value)
    evidence = {"best": value, "low": spec.get("low"), "high": spec.get("high"), "log": log, "margin": frac}
    if low is None or high is None or number is None:
        return _check(id_, None, "medium", f"{key}: the space or the best value is not numeric.", evidence)
    position = _position(number, low, high, log)
    if position is None:
        return _check(id_, None, "medium",
                      f"{key}: cannot place {_num(value)} in [{low}, {high}]{' on a log scale' if log else ''}.", evidence)
    evidence["position"] = position
    scale = "log " if log else ""
    if position <= frac or position >= 1 - frac:
        side = "low" if position <= frac else "high"
        return _check(id_, False, "medium",
                      f"{key}: the best value {_num(value)} sits at {position:.1%} of the {scale}range [{low:g}, {high:g}], "
                      f"within {frac:.0%} of the {side} end.",
                      evidence, f"widen the range of {key} towards {side}")
    return _check(id_, True, "medium",
                  f"{key}: the best value {_num(value)} sits at {position:.1%} of the {scale}range [{low:g}, {high:g}].",
                  evidence)


def _failed_check(sweep: Mapping, limit: float) -> dict:
    trials = list(sweep.get("trials") or [])
    failed = [t for t in trials if t.get("state") == "FAIL" or is_diverged(t)]
    diverged = [t for t in failed if is_diverged(t)]
    evidence = {"n_trials": len(trials), "n_failed": len(failed), "n_diverged": len(diverged),
                "n_other_failures": len(failed) - len(diverged), "threshold": limit}
    if not trials:
        return _check("failed_share", None, "high", "No trial recorded, so no failure share.", evidence)
    share = len(failed) / len(trials)
    evidence["share"] = share
    text = (f"{len(failed)} of {len(trials)} trials ({share:.0%}) failed or diverged "
            f"({len(diverged)} on a non-finite value); the limit is {limit:.0%}.")
    if share > limit:
        return _check("failed_share", False, "high", text, evidence,
                      "reparameterise / lower the learning-rate range")
    return _check("failed_share", True, "high", text, evidence)


def _spread_check(sweep: Mapping, t: Mapping) -> dict:
    """Too few trials for the spread of the results, by two numbers.

    Density: fewer complete trials than `min_complete_per_param` per swept parameter (and than `min_complete`)
    cannot have sampled the space: a 5-parameter space with 6 trials has not tried most combinations.

    Resolution: z = (best - median) / s over the complete values, with s = 1.4826 * MAD (the standard deviation
    for normal data, but not blown up by one wild trial). If the parameters did not matter and every value were
    noise, the best of n trials would still sit about 1.2 (n=5) to 1.5 (n=10) standard deviations above the
    median. A best less than `min_best_z` (1) robust deviation above the median is therefore no better than the
    luckiest of a handful of noisy trials: the trial-to-trial spread is as large as the gain the sweep found, and
    which config is best is not resolved yet. More trials (or more seeds of the top few) are needed.
    """
    values = _complete_values(sweep)
    n_params = len(sweep.get("space") or {})
    need = max(int(t["min_complete"]), int(t["min_complete_per_param"]) * n_params)
    evidence: dict[str, Any] = {"n_complete": len(values), "n_params": n_params, "min_complete": need,
                                "min_best_z": t["min_best_z"]}
    if n_params == 0:
        return _check("trials_for_spread", None, "medium", "The sweep has no parameters in its space.", evidence)
    dense = len(values) >= need
    z = None
    if len(values) >= 3:
        sign = 1 if _direction(sweep) == "max" else -1
        median = statistics.median(values)
        best = max(values, key=lambda v: sign * v)
        mad = statistics.median(abs(v - median) for v in values)
        evidence.update(best=best, median=median, std=statistics.stdev(values), robust_std=MAD_TO_STD * mad)
        if mad > 0:
            z = sign * (best - median) / (MAD_TO_STD * mad)
            evidence["best_z"] = z
    resolved = z is not None and z >= t["min_best_z"]
    if dense and z is None:
        why = "all complete trials share the median value" if len(values) >= 3 else "too few values"
        return _check("trials_for_spread", None, "medium",
                      f"{len(values)} complete trials for {n_params} parameters, but the spread cannot be measured: "
                      f"{why}.", evidence)
    parts = [f"{len(values)} complete trials for {n_params} parameters (need {need})"]
    if z is not None:
        parts.append(f"the best is {z:.2f} robust standard deviations from the median complete value "
                     f"(need {t['min_best_z']:g})")
    text = "; ".join(parts) + "."
    if dense and resolved:
        return _check("trials_for_spread", True, "medium", text, evidence)
    return _check("trials_for_spread", False, "medium", text, evidence,
                  f"run more trials (at least {need}, or more seeds of the top trials) before trusting the best")


def _best_step_check(sweep: Mapping, best: Mapping | None, t: Mapping) -> dict:
    evidence: dict[str, Any] = {"early_frac": t["early_frac"], "late_frac": t["late_frac"]}
    if best is None:
        return _check("best_step", None, "medium", "No complete trial, so no best step.", evidence)
    step, planned = _float(best.get("best_step")), _float(best.get("epochs_planned"))
    evidence.update(best_step=best.get("best_step"), epochs_run=best.get("epochs_run"),
                    epochs_planned=best.get("epochs_planned"), slot=best.get("slot"))
    if step is None or planned is None or planned <= 0:
        return _check("best_step", None, "medium",
                      "The best trial does not record its best step and planned epochs.", evidence)
    frac = step / planned
    evidence["fraction"] = frac
    where = f"The best trial (slot {best.get('slot')}) peaked at step {step:g} of {planned:g} planned ({frac:.0%})"
    if frac <= t["early_frac"]:
        return _check("best_step", False, "low", f"{where}: within the first {t['early_frac']:.0%}.", evidence,
                      f"fewer epochs (about {math.ceil(step / (1 - t['late_frac'])):d} still leave the best step at "
                      f"{1 - t['late_frac']:.0%} of training)")
    if frac > 1 - t["late_frac"]:
        return _check("best_step", False, "medium", f"{where}: within the last {t['late_frac']:.0%}, still improving.",
                      evidence, "train longer (more epochs), then sweep again")
    return _check("best_step", True, "medium", f"{where}.", evidence)


def _pruned_check(sweep: Mapping) -> dict:
    trials = list(sweep.get("trials") or [])
    pruned = sum(1 for t in trials if t.get("state") == "PRUNED")
    evidence = {"n_trials": len(trials), "n_pruned": pruned, "pruner": sweep.get("pruner")}
    if not trials:
        return _check("pruned_share", None, "info", "No trial recorded, so no pruned share.", evidence)
    evidence["share"] = pruned / len(trials)
    epochs = [(_float(t.get("epochs_run")), _float(t.get("epochs_planned"))) for t in trials]
    run = [r for r, p in epochs if r is not None and p is not None]
    planned = [p for r, p in epochs if r is not None and p is not None]
    if planned and sum(planned) > 0:
        evidence.update(epochs_run=sum(run), epochs_planned=sum(planned), epochs_share=sum(run) / sum(planned))
    # informational: pruning is a budget choice, not a fault, so it always passes when it can be counted
    return _check("pruned_share", True, "info",
                  f"{pruned} of {len(trials)} trials ({pruned / len(trials):.0%}) were pruned"
                  f" (pruner {sweep.get('pruner') or 'none'}).", evidence)


def sweep_checks(sweep: dict, thresholds: Mapping | None = None) -> list[dict]:
    """The playbook checks of a sweep summary (`sweep.json`), in report order: boundaries per parameter,
    failed share, trials for the spread, best step, pruned share."""
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    best = best_trial(sweep)
    if best is not None and best.get("params") is None:
        best = {**best, "params": (sweep.get("best") or {}).get("params") or {}}
    checks = [_boundary_check(key, spec or {}, best, float(t["boundary_frac"]))
              for key, spec in (sweep.get("space") or {}).items()]
    checks.append(_failed_check(sweep, float(t["max_failed_share"])))
    checks.append(_spread_check(sweep, t))
    checks.append(_best_step_check(sweep, best, t))
    checks.append(_pruned_check(sweep))
    return checks
