"""Seed 004's decision point (options A/B/C/D), computed from the significance numbers, never typed.

A: the requirements are met (a verified improvement, or the target by the config kept; the train-val gap and
   the seed spread under their thresholds; the target when one is set) -> finalize.
B: improved but short of A -> another round from the optimized config (`iterate`), until no round or time is
   left, the gain is at the ceiling or nothing actionable is left (then finalize the optimized config).
C: no verified improvement -> another round with the next strategy (`retry`, e.g. targeted -> sweep) while
   rounds are left, else revert to the config the round started from.
D: near the ceiling (optimization skipped, or >= 2 attempts each moving the metric by less than `ceiling_gain`)
   -> accept it.

`next` says what the workflow does: `iterate` and `retry` start another round (tunewise.phases.rounds);
`finalize`, `revert` and `accept_ceiling` end the loop.
"""
from __future__ import annotations

import math

LABELS = {
    "A": "Performance meets requirements",
    "B": "Improved but still short of the requirements",
    "C": "Worse or no verified improvement",
    "D": "Near the performance ceiling",
}
SKIPPED_LABEL = "Baseline accepted: optimization skipped"
CONTINUE = ("iterate", "retry")  # the `next` values that start another round
# the order in which C tries strategies: a point change first, then a search around it, then refinement rounds
LADDER = ("targeted", "sweep", "iterative")
ACCEPT_DEFAULTS = {"max_train_val_gap": 0.1, "max_seed_std": 0.01}


def meets_target(value: float, target: float | None, direction: str) -> bool | None:
    """None when there is no target; otherwise whether `value` reaches it in the metric's direction."""
    if target is None:
        return None
    return value >= target if direction == "max" else value <= target


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a >= b if direction == "max" else a <= b


def _decision(option: str, next_step: str, chosen_side: str, target_met: bool | None, rationale: str,
              label: str | None = None, **extra) -> dict:
    return {"option": option, "label": label or LABELS[option], "next": next_step,
            "chosen_side": chosen_side, "target_met": target_met, "rationale": rationale, **extra}


def _target_text(target: float | None, direction: str) -> str:
    if target is None:
        return "no target was set"
    return f"the target is {'>=' if direction == 'max' else '<='} {target:.4g}"


def criteria(side: str, verified: bool | None, evidence: dict | None, target_met: bool | None,
             thresholds: dict | None = None) -> list[dict]:
    """Seed 004's decision A for the config on `side`, one row per criterion: {name, value, threshold, ok}.
    `ok` is None where the criterion does not apply or was not measured (a trainer that logs no train-side
    metric has no train-val gap); only False blocks A. `evidence`: {train_val_gap, seed_std} of that side."""
    th = {**ACCEPT_DEFAULTS, **(thresholds or {})}
    ev = evidence or {}
    gap, spread = ev.get("train_val_gap"), ev.get("seed_std")
    return [
        {"name": "improvement verified", "value": None if verified is None else ("yes" if verified else "no"),
         "threshold": "significant and >= significance.min_improvement", "ok": verified},
        {"name": "relative train-val gap", "value": gap, "threshold": th["max_train_val_gap"],
         "ok": None if gap is None else gap < th["max_train_val_gap"], "side": side},
        {"name": "seed spread (std / mean)", "value": spread, "threshold": th["max_seed_std"],
         "ok": None if spread is None else spread < th["max_seed_std"], "side": side},
        {"name": "target met", "value": None if target_met is None else ("yes" if target_met else "no"),
         "threshold": "finalize.target", "ok": target_met},
    ]


def _failed(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["ok"] is False]


def _actionable_high(findings) -> list[str]:
    from tunewise.phases.diagnose import NON_ACTIONABLE

    return [f["id"] for f in findings or () if f.get("severity") == "high" and f.get("root_cause") not in NON_ACTIONABLE]


def _actionable(findings) -> list[str]:
    from tunewise.phases.diagnose import NON_ACTIONABLE

    return [f["id"] for f in findings or () if f.get("root_cause") not in NON_ACTIONABLE]


def decide(sig: dict | None, baseline_mean: float, direction: str, target: float | None, strategy: str,
           attempts: list[float] | None = None, iterations_left: int = 0, ceiling_gain: float = 0.02, *,
           evidence: dict | None = None, accept: dict | None = None, open_findings: list[dict] | None = None,
           next_strategy: str | None = None, out_of_time: bool = False, skip_reason: str | None = None,
           baseline_name: str = "the baseline config", baseline_short: str = "baseline") -> dict:
    """Pick option A/B/C/D from the significance result `sig` (tunewise.phases.significance.compare).

    `attempts`: the relative gains of this loop's rounds so far, this round's last; two or more, all under
    `ceiling_gain`, mean the ceiling is reached (D). `iterations_left`: rounds the loop may still start
    (finalize.max_iterations less those run); `out_of_time`: finalize.time_budget is spent. `evidence`:
    {side: {train_val_gap, seed_std}} for decision A's criteria, `accept` their thresholds. `open_findings`:
    the diagnosis of the improved config's own run; a high-severity actionable one keeps A back while rounds
    are left (that is B). `next_strategy`: what C tries next (None: none left). Returns `{option, label, next,
    chosen_side, target_met, rationale, criteria}`; `target_met` refers to the chosen side's mean.
    `baseline_name` / `baseline_short`: how the rationale names the compared-against config (a later round's
    is the config that round started from, not the experiment's baseline).
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    goal = _target_text(target, direction)
    evidence = evidence or {}
    rounds_left = iterations_left > 0 and not out_of_time

    if strategy == "none" or sig is None or sig.get("skipped"):
        met = meets_target(baseline_mean, target, direction)
        rows = criteria("baseline", None, evidence.get("baseline"), met, accept)
        why = skip_reason or "the diagnosis found nothing to optimize"
        if met and not _failed(rows):
            return _decision("A", "finalize", "baseline", True,
                             f"Optimization was skipped ({why}); the baseline mean {baseline_mean:.4g} meets the "
                             f"target ({goal}).", criteria=rows)
        missed = "" if met is None else f", although it misses the target ({goal})"
        return _decision("D", "accept_ceiling", "baseline", met,
                         f"Optimization was skipped ({why}), so the baseline mean {baseline_mean:.4g} is "
                         f"accepted{missed}.", label=SKIPPED_LABEL, criteria=rows)

    opt_mean = float(sig["optimized"]["mean"])
    verdict = sig["verdict"]
    numbers = (f"optimized {opt_mean:.4g} vs {baseline_short} {baseline_mean:.4g} ({direction} is better), verdict "
               f"{verdict}, one-sided p {sig.get('p_one_sided', float('nan')):.3g}, measured improvement "
               f"{sig.get('improvement_measured', float('nan')):+.4g}")
    improved = verdict == "improved"
    gains = [float(a) for a in (attempts or [])]
    if any(not math.isfinite(a) for a in gains):
        raise ValueError(f"attempts must be finite relative gains, got {attempts}")
    # the ceiling: several attempts, none of which moved the metric by the ceiling gain either way (attempts
    # that made it clearly worse say the changes were wrong, not that nothing is left to gain)
    at_ceiling = len(gains) >= 2 and all(abs(a) < ceiling_gain for a in gains)

    if improved:
        met = meets_target(opt_mean, target, direction)
        rows = criteria("optimized", True, evidence.get("optimized"), met, accept)
        failed, high = _failed(rows), _actionable_high(open_findings)
        if not failed and not (high and rounds_left):
            return _decision("A", "finalize", "optimized", met,
                             f"{numbers}; the improvement is verified, {goal} and every criterion of A holds: "
                             f"finalize the optimized config.", criteria=rows)
        short = ", ".join(failed) if failed else f"its own run still shows {', '.join(high)} (high severity)"
        this_gain = gains[-1] if gains else None
        stop = None
        if at_ceiling:
            listed = ", ".join(f"{a:+.2%}" for a in gains)
            return _decision("D", "accept_ceiling", "optimized", met,
                             f"{numbers}; {len(gains)} rounds gained {listed}, each under {ceiling_gain:.0%}: accept "
                             f"the ceiling with the verified optimized config; {goal}.", criteria=rows)
        if out_of_time:
            stop = "the time budget (finalize.time_budget) is spent"
        elif iterations_left <= 0:
            stop = "no rounds are left (finalize.max_iterations)"
        elif this_gain is not None and this_gain < ceiling_gain:
            stop = f"this round gained {this_gain:+.2%}, under the ceiling gain {ceiling_gain:.0%}"
        elif not _actionable(open_findings):
            stop = "the optimized run's diagnosis has nothing actionable left"
        if stop:
            return _decision("B", "finalize", "optimized", met,
                             f"{numbers}; improved but short of A ({short}) and {stop}: finalize with the "
                             f"optimized config; {goal}.", criteria=rows)
        return _decision("B", "iterate", "optimized", met,
                         f"{numbers}; improved but short of A ({short}): another round from the optimized config "
                         f"({iterations_left} round(s) left); {goal}.", criteria=rows)

    met = meets_target(baseline_mean, target, direction)
    rows = criteria("baseline", False, evidence.get("baseline"), met, accept)
    if met and not [r for r in _failed(rows) if r != "improvement verified"]:
        return _decision("A", "finalize", "baseline", True,
                         f"{numbers}; no verified improvement, but the baseline already meets the target "
                         f"({goal}): finalize {baseline_name}.", criteria=rows)
    if at_ceiling:
        listed = ", ".join(f"{a:+.2%}" for a in gains)
        note = ""
        if not _better_or_equal(baseline_mean, opt_mean, direction):
            note = f" (the optimized mean is better, but not verifiably so, so {baseline_name} is kept)"
        return _decision("D", "accept_ceiling", "baseline", met,
                         f"{numbers}; {len(gains)} optimization attempts gained {listed}, each under "
                         f"{ceiling_gain:.0%}: accept the ceiling with {baseline_name}{note}; {goal}.",
                         criteria=rows)
    why = {
        "worse": "the optimized config is significantly worse",
        "insufficient": "the gain is significant but below the minimum improvement",
        "no_significant_change": "the difference is not significant",
    }.get(verdict, f"verdict {verdict!r} is not an improvement")
    if rounds_left and next_strategy:
        return _decision("C", "retry", "baseline", met,
                         f"{numbers}; {why}: re-diagnose and try the next strategy, {next_strategy} "
                         f"({iterations_left} round(s) left); {goal}.", criteria=rows, next_strategy=next_strategy)
    stop = ("the time budget (finalize.time_budget) is spent" if out_of_time
            else "no rounds are left (finalize.max_iterations)" if iterations_left <= 0
            else f"no strategy is left after {strategy}")
    return _decision("C", "revert", "baseline", met,
                     f"{numbers}; {why}, and {stop}: revert to {baseline_name}; {goal}.", criteria=rows)


def improvement_box_ok(sig: dict | None, decision: dict) -> bool:
    """Checklist box: a decision that claims an improvement (chooses the optimized config) must rest on a
    verified improvement or a met target. A decision that keeps the baseline claims nothing and passes."""
    if decision.get("chosen_side") != "optimized":
        return True
    if not sig or sig.get("skipped"):
        return False
    return sig.get("verdict") == "improved" or decision.get("target_met") is True


def next_strategy(current: str, possible: set[str]) -> str | None:
    """The strategy C tries after `current` failed: the next rung of LADDER that can run here."""
    if current not in LADDER:
        return None
    for candidate in LADDER[LADDER.index(current) + 1:]:
        if candidate in possible:
            return candidate
    return None
