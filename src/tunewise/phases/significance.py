"""Multi-seed significance of baseline vs optimized (methods.md "Significance", seed 004 done properly).

Seed 004 checks `mean_opt - 2 std_opt > mean_baseline` against a single baseline number. Here both sides
are run on the same seeds and compared with Welch's t-test, a bootstrap CI of the difference and Hedges' g;
seed 004's rule is still reported, but the verdict comes from the test plus a minimum practical gain.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

DIRECTIONS = ("max", "min")
MODES = ("relative", "absolute")
VERDICTS = ("improved", "worse", "insufficient", "no_significant_change")


def _finite_array(values: Sequence[float], side: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{side}: expected a flat sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        # A diverged or failed seed must surface, not be silently dropped from the comparison.
        i = int(bad[0])
        raise ValueError(f"{side} value at position {i} is {arr[i]}: a failed seed cannot be compared; "
                         f"rerun it or fix the training")
    return arr


def summarise(values: Sequence[float], side: str = "values") -> dict:
    """`{n, mean, std, min, max}` with std at ddof=1 (None for a single value, where it is undefined)."""
    arr = _finite_array(values, side)
    if arr.size == 0:
        raise ValueError(f"{side}: no values to summarise")
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def _welch(optimized: np.ndarray, baseline: np.ndarray, alternative: str) -> tuple[float, float]:
    """(t, p) of Welch's test; scipy warns about 'precision loss' when one side is constant although the
    statistic is still well defined then, so that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        res = stats.ttest_ind(optimized, baseline, equal_var=False, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def _hedges_g(gain: float, base: np.ndarray, opt: np.ndarray) -> float | None:
    """Direction-aware Hedges' g (positive = improvement). None when both sides are constant and differ:
    the standardised effect is infinite there, which JSON cannot carry."""
    n1, n2 = base.size, opt.size
    pooled_var = ((n1 - 1) * base.var(ddof=1) + (n2 - 1) * opt.var(ddof=1)) / (n1 + n2 - 2)
    if pooled_var == 0.0:
        return 0.0 if gain == 0.0 else None
    # Small-sample correction J (Hedges 1981, the usual approximation).
    correction = 1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)
    return float(gain / math.sqrt(pooled_var) * correction)


def _bootstrap_ci(base: np.ndarray, opt: np.ndarray, sign: float, level: float,
                  n_boot: int, seed: int) -> tuple[float, float]:
    def gain(o: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return sign * (np.mean(o, axis=axis) - np.mean(b, axis=axis))

    res = stats.bootstrap((opt, base), gain, n_resamples=n_boot, paired=False, vectorized=True,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(baseline: Sequence[float], optimized: Sequence[float], direction: str = "max",
            alpha: float = 0.05, min_improvement: float = 0.03, mode: str = "relative",
            n_boot: int = 10000, seed: int = 0) -> dict:
    """Compare per-seed primary-metric values of the baseline and the optimized config.

    Returns a JSON-serialisable dict (see the keys below); `verdict` is one of VERDICTS.
    Both sides constant: p = 1.0 when the means are equal and 0.0 when they differ (there is no noise, so
    any difference is certain), the CI collapses to the observed gain, and nothing is NaN.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    base = _finite_array(baseline, "baseline")
    opt = _finite_array(optimized, "optimized")
    for side, arr in (("baseline", base), ("optimized", opt)):
        if arr.size < 2:
            raise ValueError(f"{side} needs at least 2 seeds for a t-test, got {arr.size}")

    sign = 1.0 if direction == "max" else -1.0
    base_sum, opt_sum = summarise(base, "baseline"), summarise(opt, "optimized")
    diff = opt_sum["mean"] - base_sum["mean"]
    improvement = sign * diff
    improvement_rel = improvement / abs(base_sum["mean"]) if base_sum["mean"] != 0.0 else None
    measured_as = mode
    if mode == "relative" and improvement_rel is None:
        # A relative gain over a zero baseline is undefined; the absolute gain is the only honest measure.
        measured_as = "absolute"
    improvement_measured = improvement_rel if measured_as == "relative" else improvement

    # One-sided alternatives in the direction of improvement / of worsening.
    better, worse = ("greater", "less") if direction == "max" else ("less", "greater")
    constant = base_sum["std"] == 0.0 and opt_sum["std"] == 0.0
    if constant:
        t_stat = 0.0 if diff == 0.0 else None
        p_two = 1.0 if diff == 0.0 else 0.0
        p_better = 1.0 if improvement <= 0.0 else 0.0
        p_worse = 1.0 if improvement >= 0.0 else 0.0
        ci_low = ci_high = improvement
    else:
        t_stat, p_two = _welch(opt, base, "two-sided")
        p_better = _welch(opt, base, better)[1]
        p_worse = _welch(opt, base, worse)[1]
        ci_low, ci_high = _bootstrap_ci(base, opt, sign, 1.0 - alpha, n_boot, seed)

    # The gate uses the ONE-SIDED p: the claim being tested is directional ("the optimized config is better"),
    # so a two-sided test would spend half of alpha on the uninteresting direction.
    significant_better = p_better < alpha
    if significant_better and improvement_measured >= min_improvement:
        verdict = "improved"
    elif p_worse < alpha:
        verdict = "worse"
    elif significant_better:
        verdict = "insufficient"
    else:
        verdict = "no_significant_change"

    # Seed 004's rule, direction-aware: the optimized mean minus (plus, for min) two of its stds must still
    # beat the baseline mean.
    if direction == "max":
        seed004_rule = opt_sum["mean"] - 2.0 * opt_sum["std"] > base_sum["mean"]
    else:
        seed004_rule = opt_sum["mean"] + 2.0 * opt_sum["std"] < base_sum["mean"]

    result = {
        "direction": direction,
        "alpha": alpha,
        "min_improvement": min_improvement,
        "mode": mode,
        "baseline": {**base_sum, "values": [float(v) for v in base]},
        "optimized": {**opt_sum, "values": [float(v) for v in opt]},
        "diff": float(diff),
        "improvement": float(improvement),
        "improvement_rel": None if improvement_rel is None else float(improvement_rel),
        "improvement_measured": float(improvement_measured),
        "improvement_measured_as": measured_as,
        "t_statistic": t_stat,
        "p_two_sided": p_two,
        "p_one_sided": p_better,
        "p_one_sided_worse": p_worse,
        "ci": {"level": 1.0 - alpha, "low": ci_low, "high": ci_high, "method": "percentile bootstrap",
               "n_boot": n_boot, "seed": seed, "of": "improvement (direction-aware mean difference)"},
        "ci_excludes_zero": bool(ci_low > 0.0 or ci_high < 0.0),
        "hedges_g": _hedges_g(improvement, base, opt),
        "seed004_rule": bool(seed004_rule),
        "verdict": verdict,
    }
    result["reason"] = _reason(result)
    return result


def _reason(r: dict) -> str:
    b, o = r["baseline"], r["optimized"]
    rel = f" ({r['improvement_rel']:+.2%} relative)" if r["improvement_rel"] is not None else ""
    measured = (f"{r['improvement_measured']:+.2%}" if r["improvement_measured_as"] == "relative"
                else f"{r['improvement_measured']:+.4g}")
    threshold = (f"{r['min_improvement']:.2%}" if r["improvement_measured_as"] == "relative"
                 else f"{r['min_improvement']:.4g}")
    constant = "both sides constant, " if b["std"] == 0.0 and o["std"] == 0.0 else ""
    head = (f"{constant}optimized {o['mean']:.4g} ± {o['std']:.2g} (n={o['n']}) vs baseline {b['mean']:.4g} ± "
            f"{b['std']:.2g} (n={b['n']}), {r['direction']} is better: improvement {r['improvement']:+.4g}{rel}, "
            f"one-sided Welch p = {r['p_one_sided']:.3g}, {r['ci']['level']:.0%} CI "
            f"[{r['ci']['low']:.4g}, {r['ci']['high']:.4g}]")
    tail = {
        "improved": f"significant at alpha {r['alpha']} and {measured} >= the minimum {threshold}",
        "insufficient": f"significant at alpha {r['alpha']} but {measured} is below the minimum {threshold}",
        "worse": f"significantly worse (one-sided p = {r['p_one_sided_worse']:.3g} < alpha {r['alpha']})",
        "no_significant_change": f"not significant at alpha {r['alpha']} in either direction",
    }[r["verdict"]]
    return f"{head}; {r['verdict']}: {tail}."


# --- the phase, as `tunewise significance` runs it ----------------------------------------------------------


def primary_values(run_dirs: list[str]) -> list[float]:
    """The best value of the primary metric of each finished seed run; a seed run that did not end `done`
    stops the phase (a failed seed cannot be dropped silently)."""
    from tunewise.phases import CliError
    from tunewise.runs import RunDir

    values = []
    for d in run_dirs:
        m = RunDir(d).require_finished()
        if m["status"] != "done" or m["primary"]["best"] is None:
            raise CliError(f"seed run {d} ended as {m['status']} ({m.get('reason')}); a failed seed cannot be dropped silently")
        values.append(float(m["primary"]["best"]))
    return values


def _compare_sides(exp: dict, diag: dict, base_runs: list[str], opt_runs: list[str]) -> dict:
    metric, sig_cfg = exp["metric"], exp["significance"]
    base_vals = primary_values(base_runs)
    if opt_runs:
        sig = compare(base_vals, primary_values(opt_runs), metric["direction"], sig_cfg["alpha"],
                      sig_cfg["min_improvement"], sig_cfg["improvement"], n_boot=sig_cfg["n_boot"], seed=0)
        sig["baseline"]["runs"], sig["optimized"]["runs"] = base_runs, opt_runs
    else:
        sig = {"skipped": True, "reason": diag["strategy"]["reason"],
               "baseline": {**summarise(base_vals), "values": base_vals, "runs": base_runs}}
    sig.update({"metric": metric, "seeds": sig_cfg["seeds"], "mode": sig_cfg["improvement"],
                "alpha": sig_cfg["alpha"], "min_improvement": sig_cfg["min_improvement"]})
    return sig


def _log(exp: dict, exp_dir: Path, sig: dict, decision: dict, files: list, rule: str | None) -> None:
    from tunewise.phases import tracked

    tracker = tracked.tracker(exp)
    parent = tracked.parent_run(tracker, exp, exp_dir, "significance")
    numbers = {k: sig[k] for k in ("diff", "improvement", "improvement_rel", "p_one_sided", "p_two_sided", "hedges_g") if k in sig}
    if "ci" in sig:
        numbers |= {"ci_low": sig["ci"]["low"], "ci_high": sig["ci"]["high"]}
    numbers |= {"baseline_mean": sig["baseline"]["mean"], "baseline_std": sig["baseline"]["std"]}
    if "optimized" in sig:
        numbers |= {"optimized_mean": sig["optimized"]["mean"], "optimized_std": sig["optimized"]["std"]}
    tracker.log_metrics(parent, {k: v for k, v in numbers.items() if v is not None})
    tracker.set_tags(parent, {"verdict": sig.get("verdict", "skipped"), "decision": decision["option"], "rule": rule or ""})
    tracked.log_files(tracker, parent, files)
    tracker.end_run(parent)


def decide_round(exp: dict, exp_dir: Path, diag: dict, sig: dict) -> dict:
    """Seed 004's decision for this round, with what it weighs: decision A's criteria on each side, the
    diagnosis of the improved config's own run, the gains of the rounds before, the rounds and time left, and
    the strategy C would try next."""
    from tunewise.phases import rounds
    from tunewise.phases.decision import decide, next_strategy

    fin = exp["finalize"]
    skipped = bool(sig.get("skipped"))
    evidence = {side: rounds.side_evidence(exp, sig.get(side)) for side in ("baseline", "optimized")}
    improved = not skipped and sig.get("verdict") == "improved"
    open_findings = rounds.run_findings(exp, (evidence["optimized"] or {}).get("run_dir")) if improved else []
    attempts = rounds.earlier_gains(exp) + ([] if skipped else [rounds.round_gain(sig)])
    index = rounds.round_index(exp)
    elapsed = rounds.minutes_since_start(rounds.base_dir(exp, exp_dir))
    out_of_time = fin.get("time_budget") is not None and elapsed is not None and elapsed > fin["time_budget"]
    strategy = diag["strategy"]["chosen"]
    # a later round's "baseline" is the config it started from: say which, not the experiment's
    names = {}
    if index > 1:
        start = rounds.round_info(exp).get("incumbent") or {}
        names = {"baseline_name": f"the config round {index} started from (the {start.get('side')} config of "
                                  f"round {start.get('round')})", "baseline_short": "its starting config"}
    decision = decide(None if skipped else sig, sig["baseline"]["mean"], exp["metric"]["direction"], fin["target"],
                      strategy, attempts=attempts, iterations_left=fin["max_iterations"] - (index - 1),
                      ceiling_gain=fin.get("ceiling_gain", 0.02), evidence=evidence, accept=fin.get("accept"),
                      open_findings=open_findings, out_of_time=out_of_time,
                      next_strategy=next_strategy(strategy, rounds.possible_strategies(exp, diag)),
                      skip_reason=diag["strategy"]["reason"] if skipped else None, **names)
    decision.update({
        "target": fin["target"], "round": index, "strategy": strategy, "attempts": attempts,
        "rounds_left": max(0, fin["max_iterations"] - (index - 1)), "minutes_elapsed": elapsed,
        "time_budget": fin.get("time_budget"), "evidence": evidence,
        "open_findings": [{k: f[k] for k in ("id", "root_cause", "severity")} for f in open_findings],
    })
    return decision


def judge(exp: dict, exp_dir: Path, diagnosis_path: Path, baseline_runs: list[str], optimized_runs: list[str],
          out_dir: Path, *, optimize_run: str | Path | None = None, report: Callable | None = None,
          rule: str | None = None) -> tuple[dict, dict]:
    """The multi-seed comparison and the decision point: significance.json and decision.json in `out_dir`,
    `report(significance_json, decision_json, baseline_run_dir, optimize_run_dir, extra)` writing the optimization results
    (it returns their paths), all logged to the experiment's `significance` parent run. Empty run names (an
    empty list as Snakemake quotes it) are dropped. Returns (significance, decision)."""
    from tunewise.phases.decision import decide
    from tunewise.phases.gates import optimize_run_dir
    from tunewise.runs import read_json, write_json

    diag = read_json(diagnosis_path)
    sig = _compare_sides(exp, diag, [d for d in baseline_runs if d], [d for d in optimized_runs if d])
    decision = decide_round(exp, Path(exp_dir), diag, sig)
    out = Path(out_dir)
    write_json(out / "significance.json", sig)
    write_json(out / "decision.json", decision)
    strategy_dir = Path(exp_dir) / "optimize" / diag["strategy"]["chosen"]
    extra = {f"{name}_json": strategy_dir / f"{name}.json" for name in ("sweep", "iterative")
             if (strategy_dir / f"{name}.json").exists()}
    reports = report(out / "significance.json", out / "decision.json", Path(diag["baseline"]["run_dir"]),
                     optimize_run_dir(exp_dir, diag, optimize_run), extra) if report else []
    _log(exp, exp_dir, sig, decision, [out / "significance.json", out / "decision.json", *reports], rule)
    print(f"significance: {sig.get('verdict', 'skipped')}; decision {decision['option']} ({decision['label']})")
    return sig, decision
