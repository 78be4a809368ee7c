"""Seed 004's decision point (options A/B/C/D), computed from the significance numbers, never typed.

A: the target is met -> finalize.  B: improved but short of the target -> iterate (or finalize when no
iterations are left).  C: worse or no verified improvement -> revert to the baseline config.
D: near the ceiling (optimization skipped, or >= 2 attempts each under `ceiling_gain`) -> accept it.
"""
from __future__ import annotations

import math

LABELS = {
    "A": "Performance meets requirements",
    "B": "Improved but still short of the target",
    "C": "Worse or no verified improvement: revert to baseline",
    "D": "Near the performance ceiling",
}
SKIPPED_LABEL = "Baseline accepted: optimization skipped"


def meets_target(value: float, target: float | None, direction: str) -> bool | None:
    """None when there is no target; otherwise whether `value` reaches it in the metric's direction."""
    if target is None:
        return None
    return value >= target if direction == "max" else value <= target


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a >= b if direction == "max" else a <= b


def _decision(option: str, next_step: str, chosen_side: str, target_met: bool | None, rationale: str,
              label: str | None = None) -> dict:
    return {"option": option, "label": label or LABELS[option], "next": next_step,
            "chosen_side": chosen_side, "target_met": target_met, "rationale": rationale}


def _target_text(target: float | None, direction: str) -> str:
    if target is None:
        return "no target was set"
    return f"the target is {'>=' if direction == 'max' else '<='} {target:.4g}"


def decide(sig: dict | None, baseline_mean: float, direction: str, target: float | None, strategy: str,
           attempts: list[float] | None = None, iterations_left: int = 0,
           ceiling_gain: float = 0.02) -> dict:
    """Pick option A/B/C/D from the significance result `sig` (tunewise.phases.significance.compare).

    `attempts` are the relative gains of the optimization attempts so far (iterative rounds); two or more,
    all under `ceiling_gain`, mean the ceiling is reached. Returns `{option, label, next, chosen_side,
    target_met, rationale}`; `target_met` refers to the chosen side's mean (None without a target).
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    goal = _target_text(target, direction)

    if strategy == "none" or sig is None or sig.get("skipped"):
        met = meets_target(baseline_mean, target, direction)
        if met:
            return _decision("A", "finalize", "baseline", True,
                             f"Optimization was skipped ({strategy}); the baseline mean {baseline_mean:.4g} "
                             f"meets the target ({goal}).")
        missed = "" if met is None else f", although it misses the target ({goal})"
        return _decision("D", "accept_ceiling", "baseline", met,
                         f"Optimization was skipped ({strategy}): the diagnosis judged the baseline near its "
                         f"ceiling, so the baseline mean {baseline_mean:.4g} is accepted{missed}.",
                         label=SKIPPED_LABEL)

    opt_mean = float(sig["optimized"]["mean"])
    verdict = sig["verdict"]
    numbers = (f"optimized {opt_mean:.4g} vs baseline {baseline_mean:.4g} ({direction} is better), verdict "
               f"{verdict}, one-sided p {sig.get('p_one_sided', float('nan')):.3g}, measured improvement "
               f"{sig.get('improvement_measured', float('nan')):+.4g}")
    improved = verdict == "improved"

    # A: the target is met by a side we are entitled to choose — the optimized config only with a verified
    # improvement, otherwise the baseline (a non-significant gain does not justify switching configs).
    if improved and meets_target(opt_mean, target, direction) is not False:
        return _decision("A", "finalize", "optimized", meets_target(opt_mean, target, direction),
                         f"{numbers}; the improvement is verified and {goal}: finalize the optimized config.")
    if not improved and meets_target(baseline_mean, target, direction):
        return _decision("A", "finalize", "baseline", True,
                         f"{numbers}; no verified improvement, but the baseline already meets the target "
                         f"({goal}): finalize the baseline config.")

    gains = [float(a) for a in (attempts or [])]
    if any(not math.isfinite(a) for a in gains):
        raise ValueError(f"attempts must be finite relative gains, got {attempts}")
    if len(gains) >= 2 and all(a < ceiling_gain for a in gains):
        # Choose the optimized side only when its gain is verified; "better by mean" alone is noise-prone and
        # would fail the checklist box "Performance improvement verified".
        chosen = "optimized" if improved else "baseline"
        chosen_mean = opt_mean if improved else baseline_mean
        note = ""
        if not improved and not _better_or_equal(baseline_mean, opt_mean, direction):
            note = " (the optimized mean is better, but not verifiably so, so the baseline config is kept)"
        listed = ", ".join(f"{a:+.2%}" for a in gains)
        return _decision("D", "accept_ceiling", chosen, meets_target(chosen_mean, target, direction),
                         f"{numbers}; {len(gains)} optimization attempts gained {listed}, each under "
                         f"{ceiling_gain:.0%}: accept the ceiling with the {chosen} config{note}; {goal}.")

    if improved:
        if iterations_left > 0:
            return _decision("B", "iterate", "optimized", False,
                             f"{numbers}; improved but {goal} is not met: iterate "
                             f"({iterations_left} iteration(s) left).")
        return _decision("B", "finalize", "optimized", False,
                         f"{numbers}; improved but {goal} is missed and no iterations are left: finalize "
                         f"with the optimized config.")

    why = {
        "worse": "the optimized config is significantly worse",
        "insufficient": "the gain is significant but below the minimum improvement",
        "no_significant_change": "the difference is not significant",
    }.get(verdict, f"verdict {verdict!r} is not an improvement")
    return _decision("C", "revert", "baseline", meets_target(baseline_mean, target, direction),
                     f"{numbers}; {why}: revert to the baseline config and re-analyze; {goal}.")


def improvement_box_ok(sig: dict | None, decision: dict) -> bool:
    """Checklist box: a decision that claims an improvement (chooses the optimized config) must rest on a
    verified improvement or a met target. A decision that keeps the baseline claims nothing and passes."""
    if decision.get("chosen_side") != "optimized":
        return True
    if not sig or sig.get("skipped"):
        return False
    return sig.get("verdict") == "improved" or decision.get("target_met") is True
