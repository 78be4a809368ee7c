"""Phase 3: diagnose a training run from its curves (`history.csv` + `metrics.json`).

Rules follow Google's Deep Learning Tuning Playbook and seed 004 (reference/methods.md, "Diagnosis
rules"). Each rule reads only the run-directory contract, so the engine serves every trainer. A finding is
`{id, root_cause, severity, summary, evidence}`; every finding carries numbers as evidence, because the
diagnostics gate and the report quote them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tunewise.thresholds import DEFAULT_THRESHOLDS

# too_short: a run with too few history rows to read its curves; actionable (a longer run), never "nothing to fix"
ROOT_CAUSES = ("data", "lr_too_high", "overfitting", "underfitting", "lr_too_low", "early_plateau", "noisy", "too_short",
               "resources", "unknown")
SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}
# findings that do not call for a config change of the model/optimiser: they never justify optimizing
NON_ACTIONABLE = frozenset({"resources", "unknown", "data"})

_BOUNDED_METRIC = re.compile(r"(^|[_\-/])(r2|acc|accuracy|sim|similarity)([_\-]|$)")


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """`history.csv` (an empty frame when the run wrote none) and `metrics.json` of a run directory."""
    from tunewise.runs import RunDir, read_history, read_json

    return read_history(run_dir), read_json(RunDir(run_dir).metrics_path)


# --- small numeric pieces ---------------------------------------------------------------------------------


def _values(history: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)


def _steps(history: pd.DataFrame) -> np.ndarray:
    if "step" in history:
        return pd.to_numeric(history["step"], errors="coerce").to_numpy(dtype=float)
    return np.arange(1, len(history) + 1, dtype=float)


def _tail_rows(n: int, frac: float) -> int:
    return max(1, math.ceil(frac * n))


def _end(values: np.ndarray, rows: int) -> float:
    return float(np.mean(values[-max(1, min(rows, len(values))):]))


def _running_gain(goodness: np.ndarray, tail: int) -> tuple[float, float]:
    """(gain of the running best over the last `tail` rows, total gain of the running best over the first value).

    The running best ignores noise below the best so far: a wobble at a plateau is not improvement.
    """
    best = np.maximum.accumulate(goodness)
    before = best[-tail - 1] if len(best) > tail else goodness[0]
    return float(best[-1] - before), float(best[-1] - goodness[0])


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _finding(fid: str, root_cause: str, severity: str, summary: str, evidence: dict) -> dict:
    clean = {k: (int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v))
             for k, v in evidence.items() if v is not None and math.isfinite(float(v))}
    return {"id": fid, "root_cause": root_cause, "severity": severity, "summary": summary, "evidence": clean}


def train_counterpart(primary: str) -> str | None:
    return "train/" + primary[len("val/"):] if primary.startswith("val/") else None


def _p90_grad_norm(history: pd.DataFrame, upto: int | None = None) -> float | None:
    """Mean of the per-epoch 90th percentiles: what methods.md says to clip at."""
    if "grad_norm_p90" not in history:
        return None
    p90 = _values(history, "grad_norm_p90")[:upto]
    p90 = p90[np.isfinite(p90)]
    return float(p90.mean()) if len(p90) else None


# --- rules on column averages (meaningful on any length, diverged or not) -------------------------------


def _grad_clipping(history: pd.DataFrame, th: dict) -> list[dict]:
    if "grad_clip_frac" not in history:
        return []
    frac = _values(history, "grad_clip_frac")
    frac = frac[np.isfinite(frac)]
    if not len(frac) or frac.mean() <= th["clip_frac"]:
        return []
    p90 = _p90_grad_norm(history)
    tail = f"; the 90th percentile of gradient norms is {_fmt(p90)}" if p90 is not None else ""
    return [_finding(
        "grad_clipping", "lr_too_high", "medium",
        f"Gradient clipping was active on {frac.mean():.0%} of steps on average (above "
        f"{th['clip_frac']:.0%}){tail}: the learning rate is too high for the clipping bound.",
        {"grad_clip_frac": frac.mean(), "grad_norm_p90": p90},
    )]


def _large_updates(history: pd.DataFrame, th: dict) -> list[dict]:
    if "update_ratio" not in history:
        return []
    ratio = _values(history, "update_ratio")
    ratio = ratio[np.isfinite(ratio)]
    if not len(ratio) or float(np.median(ratio)) <= th["update_ratio_high"]:
        return []
    median = float(np.median(ratio))
    return [_finding(
        "large_updates", "lr_too_high", "medium",
        f"Each optimizer step changed the weights by {median:.2%} of their norm (median over epochs; "
        f"above {th['update_ratio_high']:.2%}, where about 0.1% is healthy): the learning rate is too high.",
        {"update_ratio_median": median, "update_ratio_max": float(ratio.max()),
         "update_ratio_high": th["update_ratio_high"], "grad_norm_p90": _p90_grad_norm(history)},
    )]


def _input_bound(history: pd.DataFrame, th: dict) -> list[dict]:
    if "data_frac" not in history:
        return []
    frac = _values(history, "data_frac")
    frac = frac[np.isfinite(frac)]
    if not len(frac) or frac.mean() <= th["data_frac"]:
        return []
    sps = _values(history, "samples_per_s") if "samples_per_s" in history else np.array([])
    sps = sps[np.isfinite(sps)]
    rate = float(sps.mean()) if len(sps) else None
    rate_text = f" at {_fmt(rate)} samples/s" if rate is not None else ""
    return [_finding(
        "input_bound", "resources", "low",
        f"Training waited for batches {frac.mean():.0%} of each epoch on average (above "
        f"{th['data_frac']:.0%}){rate_text}: the input pipeline, not the model, bounds throughput.",
        {"data_frac": frac.mean(), "samples_per_s": rate},
    )]


def _too_short(n: int, metrics: dict, th: dict) -> dict:
    """A run too short to judge: not a run near its ceiling, but one to run longer and diagnose again."""
    planned = metrics.get("epochs_planned")
    stopped = " (it stopped early)" if metrics.get("stopped_early") else ""
    return _finding(
        "insufficient_history", "too_short", "medium",
        f"Only {n} history rows (fewer than {th['min_rows']}){stopped}: the run is too short to judge its curves, "
        f"so nothing is known about its ceiling; train longer (more epochs/steps) and diagnose again.",
        {"rows": n, "min_rows": int(th["min_rows"]), "epochs_planned": planned, "epochs_run": metrics.get("epochs_run")},
    )


def _gradient_norms(history: pd.DataFrame, good: np.ndarray, train_short: bool | None, th: dict) -> list[dict]:
    """Exploding or vanishing gradients from the `grad_norm` column (the shared loop's per-epoch mean, or what a
    trainer logs under that name, e.g. a prompt's gradient), measured against its own start so any scale works."""
    if "grad_norm" not in history:
        return []
    norm = _values(history, "grad_norm")
    n = len(norm)
    tail = _tail_rows(n, th["tail_frac"])
    start = norm[:tail][np.isfinite(norm[:tail])]
    end = norm[-min(th["end_rows"], n):]
    if n < th["min_rows"] or not len(start) or not np.isfinite(end).all():
        return []
    start_median, end_mean = float(np.median(start)), float(np.mean(end))
    if start_median <= 0:
        return []
    ratio = end_mean / start_median
    evidence = {"grad_norm_start": start_median, "grad_norm_end": end_mean, "grad_norm_ratio": ratio,
                "grad_norm_max": float(np.nanmax(norm))}
    if ratio > th["grad_explode_ratio"]:
        return [_finding(
            "exploding_gradients", "lr_too_high", "high",
            f"The gradient norm grew from {_fmt(start_median)} (median over the first {tail} steps) to {_fmt(end_mean)} "
            f"at the end, {ratio:.3g}x (above {th['grad_explode_ratio']:g}x): the updates feed on themselves, the "
            f"learning rate is too high.",
            {**evidence, "grad_explode_ratio": th["grad_explode_ratio"]},
        )]
    recent, total = _running_gain(good, tail)
    flat = total <= 0 or recent < th["flat_frac"] * total
    if ratio < th["grad_vanish_ratio"] and flat and train_short is not False:
        return [_finding(
            "vanishing_gradients", "underfitting", "medium",
            f"The gradient norm fell from {_fmt(start_median)} (median over the first {tail} steps) to "
            f"{_fmt(end_mean)} at the end ({ratio:.2g}x, below {th['grad_vanish_ratio']:g}x) while the primary metric "
            f"stopped improving short of good: the updates carry almost no signal any more.",
            {**evidence, "grad_vanish_ratio": th["grad_vanish_ratio"]},
        )]
    return []


def _validation_plateau(history: pd.DataFrame, good: np.ndarray, primary: str, th: dict) -> list[dict]:
    """Validation stops improving while the training loss still falls (and the best step is not early, which
    `best_step_early` reports): the case for a schedule that lowers the LR as progress stalls."""
    if "train/loss" not in history:
        return []
    n = len(good)
    span = max(1, math.ceil(th["plateau_frac"] * n))
    if n < th["early_min_rows"] or span >= n:
        return []
    best_i = int(np.argmax(good))
    if best_i >= n - span or best_i + 1 <= th["early_frac"] * n:
        return []
    recent, total = _running_gain(good, span)
    if total <= 0 or recent >= th["flat_frac"] * total:
        return []
    loss = _values(history, "train/loss")
    if not np.isfinite(loss).all() or loss.max() <= loss.min():
        return []
    # the loss's own drop over the plateau, end against its start, both averaged so one noisy step decides nothing
    rows = min(th["end_rows"], span)
    drop = float(np.mean(loss[n - span - 1: n - span - 1 + rows]) - _end(loss, rows)) / float(loss.max() - loss.min())
    if drop <= th["plateau_train_drop"]:
        return []
    steps = _steps(history)
    return [_finding(
        "validation_plateau", "early_plateau", "low",
        f"{primary} stopped improving at step {int(steps[best_i])} of {n}: its best gained {_fmt(recent)} of a total "
        f"{_fmt(total)} over the last {span} steps, while the training loss still fell by {drop:.0%} of its range "
        f"there: training continues and validation does not follow.",
        {"best_step": int(steps[best_i]), "epochs_run": n, "recent_gain": recent, "total_gain": total,
         "train_loss_drop_share": drop},
    )]


# --- divergence -------------------------------------------------------------------------------------------


def _divergence(history: pd.DataFrame, metrics: dict, primary: str) -> dict | None:
    n = len(history)
    steps = _steps(history)
    first: int | None = None
    for column in ("train/loss", primary):
        if column in history and n:
            bad = ~np.isfinite(_values(history, column))
            if bad.any():
                i = int(np.argmax(bad))
                first = i if first is None else min(first, i)
    if first is None and metrics.get("status") != "diverged":
        return None
    # a run stopped for a non-finite loss may have raised before writing the row: the step after the last one
    step = int(steps[first]) if first is not None else (int(steps[-1]) + 1 if n else 1)
    upto = first if first is not None else n
    last_loss = None
    if "train/loss" in history and upto:
        loss = _values(history, "train/loss")[:upto]
        loss = loss[np.isfinite(loss)]
        last_loss = float(loss[-1]) if len(loss) else None
    loss_text = f" after a last finite training loss of {_fmt(last_loss)}" if last_loss is not None else ""
    return _finding(
        "divergence", "lr_too_high", "high",
        f"Training diverged: the first non-finite training loss or {primary} appeared at step {step}{loss_text}.",
        {"first_nonfinite_step": step, "last_finite_loss": last_loss, "grad_norm_p90": _p90_grad_norm(history, upto)},
    )


# --- curve rules ------------------------------------------------------------------------------------------


def _training_loss_rules(history: pd.DataFrame, th: dict, from_step: int | None = None) -> list[dict]:
    """Rising and oscillating training loss, judged from `from_step` on (the step from which the training
    objective has its final form: GroupDRO's warm-up is plain ERM, and the switch to the q-weighted loss
    makes the loss jump once, which says nothing about the learning rate)."""
    if "train/loss" not in history:
        return []
    if from_step is not None and from_step > 1:
        kept = history[_steps(history) >= from_step]
        if len(kept) >= th["min_rows"]:
            history = kept
    loss, steps = _values(history, "train/loss"), _steps(history)
    n = len(loss)
    lo, hi = float(loss.min()), float(loss.max())
    span = hi - lo
    if span <= 0:
        return []
    found = []
    tail = max(3, _tail_rows(n, th["tail_frac"]))
    slope = float(np.polyfit(steps[-tail:], loss[-tail:], 1)[0])
    rise = (loss[-1] - lo) / span
    if rise > th["rising_frac"] and slope > 0:
        min_step = int(steps[int(np.argmin(loss))])
        found.append(_finding(
            "rising_train_loss", "lr_too_high", "high",
            f"Training loss rose to {_fmt(loss[-1])} at the end, {rise:.0%} of its range above its minimum "
            f"{_fmt(lo)} at step {min_step} (slope {_fmt(slope)} per step over the last {tail} steps).",
            {"final_loss": loss[-1], "min_loss": lo, "min_step": min_step, "rise_share": rise, "tail_slope": slope,
             "grad_norm_p90": _p90_grad_norm(history)},
        ))
    half = loss[n // 2:]
    if len(half) >= 3:
        jitter = float(np.std(np.diff(half)))
        level = float(np.median(np.abs(half)))
        rel_span = jitter / span
        rel_level = jitter / level if level > 0 else math.inf
        if rel_span > th["loss_jitter_rel"] and rel_level > th["loss_jitter_level"]:
            found.append(_finding(
                "loss_oscillation", "lr_too_high", "medium",
                f"Training loss jumps between epochs in the second half: step-to-step std {_fmt(jitter)} is "
                f"{rel_span:.0%} of the loss range {_fmt(span)} and {rel_level:.0%} of the loss level {_fmt(level)}.",
                {"loss_diff_std": jitter, "loss_range": span, "jitter_to_range": rel_span,
                 "jitter_to_level": min(rel_level, 1e12), "grad_norm_p90": _p90_grad_norm(history)},
            ))
    return found


def _second_half_jitter(values: np.ndarray) -> tuple[float, float] | None:
    """(std of first differences over the second half, range of the whole curve); None when too short or flat."""
    half = values[len(values) // 2:]
    span = float(values.max() - values.min())
    if len(half) < 3 or span <= 1e-12:
        return None
    return float(np.std(np.diff(half))), span


def _noisy_validation(history: pd.DataFrame, val: np.ndarray, primary: str, train: np.ndarray | None,
                      train_col: str | None, th: dict, sign: float = 1.0) -> list[dict]:
    measured = _second_half_jitter(val)
    if measured is None:
        return []
    if np.all(sign * np.diff(val[len(val) // 2:]) >= 0):
        # a curve that only ever improves (a best-so-far metric, or a steady climb) has uneven steps, not noise
        return []
    jitter, span = measured
    rel = jitter / span
    if rel <= th["val_jitter_rel"]:
        return []
    evidence = {"val_diff_std": jitter, "val_range": span, "jitter_to_range": rel}
    train_measured = _second_half_jitter(train) if train is not None else None
    if train_measured is not None:
        t_jitter, t_span = train_measured
        evidence["train_jitter_to_range"] = t_jitter / t_span
        # a fixed validation set only jumps when the weights do; if the training metric at the same epochs jumps
        # as well, the step size, not the size of the validation set, is the cause
        if t_jitter / t_span > th["train_jitter_rel"]:
            return [_finding(
                "unstable_training", "lr_too_high", "medium",
                f"{primary} and {train_col} both jump between epochs in the second half: step-to-step std "
                f"{_fmt(jitter)} is {rel:.0%} of the validation range {_fmt(span)}, and {_fmt(t_jitter)} is "
                f"{t_jitter / t_span:.1%} of the training range {_fmt(t_span)} (above "
                f"{th['train_jitter_rel']:.1%}): the weights move too far each epoch, the learning rate is too high.",
                {**evidence, "train_diff_std": t_jitter, "train_range": t_span,
                 "grad_norm_p90": _p90_grad_norm(history)},
            )]
    return [_finding(
        "noisy_validation", "noisy", "medium",
        f"{primary} is noisy between epochs in the second half: step-to-step std {_fmt(jitter)} is {rel:.0%} of "
        f"its range {_fmt(span)}, so its best step is partly chance.",
        evidence,
    )]


def _bounded(primary: str) -> bool:
    return bool(_BOUNDED_METRIC.search(primary.rsplit("/", 1)[-1].lower()))


def thresholds_for(trainer, exp: dict) -> dict | None:
    """The thresholds a diagnosis of this experiment uses: the trainer's own (`diagnosis_thresholds`, for curves
    that behave differently, e.g. a loss measured at projected prompts), then the experiment's `diagnose.thresholds`."""
    merged = {**(getattr(trainer, "diagnosis_thresholds", None) or {}),
              **((exp.get("diagnose") or {}).get("thresholds") or {})}
    return merged or None


def diagnose(history: pd.DataFrame, metrics: dict, primary: str, direction: str,
             thresholds: dict | None = None) -> list[dict]:
    """Findings for one run, sorted by severity (high first) then id; none for a healthy run.

    `history` follows the `history.csv` contract, `metrics` the `metrics.json` one; `primary` is the
    validation metric that selects the best step, `direction` "max" or "min". `thresholds` override
    `DEFAULT_THRESHOLDS` key by key (an unknown key is an error, so a typo is not silently ignored).
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown diagnosis thresholds {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}")
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    sign = 1.0 if direction == "max" else -1.0

    averages = _grad_clipping(history, th) + _large_updates(history, th) + _input_bound(history, th)
    diverged = _divergence(history, metrics, primary)
    if diverged is not None:
        # the curve before a blow-up says little about generalisation or convergence: report the blow-up
        return _sorted([diverged, *averages])
    if primary not in history:
        raise ValueError(f"history has no column {primary!r} (the primary metric); columns: {list(history.columns)}")
    n = len(history)
    if n < th["min_rows"]:
        return _sorted([_too_short(n, metrics, th), *averages])

    steps = _steps(history)
    val = _values(history, primary)
    good = sign * val
    best_i = int(np.argmax(good))
    best_step, best_value = int(steps[best_i]), float(val[best_i])
    tail = _tail_rows(n, th["tail_frac"])
    val_end = _end(val, th["end_rows"])
    train_col = train_counterpart(primary)
    train = _values(history, train_col) if train_col and train_col in history else None
    if train is not None and not np.isfinite(train).all():
        train = None
    from_step = metrics.get("objective_from_step")
    found = [*averages, *_training_loss_rules(history, th, int(from_step) if from_step else None),
             *_noisy_validation(history, val, primary, train, train_col, th, sign)]
    gap = threshold = train_end = None
    if train is not None:
        train_end = _end(train, th["end_rows"])
        gap = sign * (train_end - val_end)
        threshold = max(th["gap_abs"], th["gap_rel"] * max(abs(train_end), abs(val_end)))

    # overfitting: a large gap and validation getting worse after its best step
    if gap is not None and gap > threshold:
        degradation = sign * (best_value - val_end)
        span = float(val.max() - val.min())
        worse_primary = best_i < n - 1 and degradation > th["worsen_rel"] * span
        val_loss_rise = None
        if "val/loss" in history and primary != "val/loss":
            vloss = _values(history, "val/loss")
            if np.isfinite(vloss).all() and vloss.max() > vloss.min():
                val_loss_rise = _end(vloss, th["end_rows"]) - float(vloss.min())
                worse_loss = val_loss_rise > th["worsen_rel"] * float(vloss.max() - vloss.min())
            else:
                worse_loss = False
        else:
            worse_loss = False
        if worse_primary or worse_loss:
            found.append(_finding(
                "overfitting", "overfitting", "high" if gap > 2 * threshold else "medium",
                f"Train/validation gap of {_fmt(gap)} at the end ({train_col} {_fmt(train_end)} vs {primary} "
                f"{_fmt(val_end)}, threshold {_fmt(threshold)}), and {primary} fell from its best {_fmt(best_value)} "
                f"at step {best_step} by {_fmt(degradation)}.",
                {"gap": gap, "gap_threshold": threshold, "train_end": train_end, "val_end": val_end,
                 "best_step": best_step, "best_value": best_value, "degradation": degradation,
                 "val_loss_rise": val_loss_rise},
            ))

    # underfitting: training metric poor and flat, validation flat too, and the gap small next to the shortfall
    good_enough = th["good_enough"]
    if good_enough is None and direction == "max" and _bounded(primary):
        good_enough = th["bounded_good_enough"]
    if train is not None and good_enough is not None:
        shortfall = sign * (good_enough - train_end)
        if shortfall > 0 and gap <= max(threshold, th["underfit_gap_share"] * shortfall):
            t_recent, t_total = _running_gain(sign * train, tail)
            v_recent, v_total = _running_gain(good, tail)
            train_flat = t_total <= 0 or t_recent < th["flat_frac"] * t_total
            val_flat = v_total <= 0 or v_recent < th["flat_frac"] * v_total
            if train_flat and val_flat:
                found.append(_finding(
                    "underfitting", "underfitting", "high",
                    f"{train_col} is flat at {_fmt(train_end)}, short of {_fmt(good_enough)}: it gained "
                    f"{_fmt(t_recent)} over the last {tail} steps of a total {_fmt(t_total)}, with a gap of only "
                    f"{_fmt(gap)} to {primary} {_fmt(val_end)} against a shortfall of {_fmt(shortfall)}.",
                    {"train_end": train_end, "val_end": val_end, "good_enough": good_enough, "gap": gap,
                     "shortfall": shortfall,
                     "train_recent_gain": t_recent, "train_total_gain": t_total},
                ))

    train_short = None
    if train is not None and good_enough is not None:
        train_short = bool(sign * (good_enough - train_end) > 0)
    found += _gradient_norms(history, good, train_short, th)
    if not any(f["id"] == "overfitting" for f in found):
        found += _validation_plateau(history, good, primary, th)

    # still improving at the end: compute-bound, or the LR is too low to converge in the budget
    recent, total = _running_gain(good, tail)
    if best_i >= n - tail and total > 0 and recent > th["still_improving_frac"] * total:
        planned = metrics.get("epochs_planned")
        found.append(_finding(
            "still_improving", "lr_too_low", "medium",
            f"{primary} was still improving at the end: best {_fmt(best_value)} at step {best_step} of {n}, and "
            f"{recent / total:.0%} of its total gain ({_fmt(recent)} of {_fmt(total)}) came in the last {tail} steps.",
            {"best_step": best_step, "epochs_run": n, "epochs_planned": planned, "recent_gain": recent,
             "total_gain": total, "recent_share": recent / total},
        ))

    # saturated early: the budget after the best step bought nothing. A curve that never moved has no peak (its
    # first row only wins the tie): nothing was learnt, which is not saturation, and fewer steps would not help
    if n >= th["early_min_rows"] and best_i + 1 <= th["early_frac"] * n and val.max() > val.min():
        found.append(_finding(
            "best_step_early", "early_plateau", "low",
            f"{primary} peaked at {_fmt(best_value)} at step {best_step} of {n} (within the first "
            f"{th['early_frac']:.0%}) and ended at {_fmt(val_end)}: most of the training budget bought nothing.",
            {"best_step": best_step, "epochs_run": n, "best_value": best_value, "final_value": val_end},
        ))
    return _sorted(found)


FINDING_KEYS = ("id", "root_cause", "severity", "summary", "evidence")


def trainer_findings(trainer, history: pd.DataFrame, metrics: dict, metric: dict, thresholds: dict) -> list[dict]:
    """The generic findings and those the trainer adds (`extra_findings`), sorted as `diagnose` sorts. The
    thresholds a trainer declares beyond the generic ones (`diagnosis_thresholds`) are its rules' alone."""
    from tunewise.trainers.base import capability

    own = set(capability(trainer, "diagnosis_thresholds")) - set(DEFAULT_THRESHOLDS)
    generic = {k: v for k, v in thresholds.items() if k not in own}
    findings = diagnose(history, metrics, metric["name"], metric["direction"], generic or None)
    extra = capability(trainer, "extra_findings")(history, metrics, {**DEFAULT_THRESHOLDS, **thresholds})
    for f in extra:
        missing = [k for k in FINDING_KEYS if k not in f]
        if missing or f["severity"] not in SEVERITY_ORDER:
            raise ValueError(f"trainer {trainer.name!r}: extra_findings gave {f.get('id', f)!r} without "
                             f"{missing or 'a known severity'} (a finding has {', '.join(FINDING_KEYS)}; severity one "
                             f"of {', '.join(SEVERITY_ORDER)})")
    return _sorted(findings + list(extra))


def _sorted(findings: list[dict]) -> list[dict]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f["severity"]], f["id"]))


def _meets(value: float, target: float, direction: str) -> bool:
    return value >= target if direction == "max" else value <= target


def _relative_gap(value: float | None, target: float | None, direction: str) -> float | None:
    """How far `value` is short of `target`, relative to |target| (None without both, <= 0 when met)."""
    if value is None or target is None or target == 0:
        return None
    short = target - value if direction == "max" else value - target
    return short / abs(target)


def choose_strategy(requested: str, findings: list[dict], baseline_value: float | None, target: float | None,
                    direction: str, available: set[str], iterative_gap: float = 0.1) -> dict:
    """The optimization strategy: `{"chosen", "requested", "reason"}` (DESIGN.md, strategy `auto`).

    `auto`: the target already met, or no actionable finding (only `resources`/`unknown`) -> `none`
    (skip to significance/finalize); one root cause -> `targeted`; several -> `sweep` when available, else
    `targeted` with a reason saying a sweep would be preferred. One root cause but a target further away than
    `iterative_gap` (relative) -> `iterative` when available ("promising but insufficient": one fix rarely
    closes a wide gap, so rounds of diagnose -> fix -> train follow). Any other `requested` strategy is
    honoured as is; one not in `available` raises ValueError.
    """
    if requested != "auto":
        if requested not in available:
            raise ValueError(f"optimization strategy {requested!r} is not available here; available: {sorted(available)}")
        return {"chosen": requested, "requested": requested, "reason": f"strategy {requested!r} requested in the config"}

    def pick(chosen: str, reason: str) -> dict:
        return {"chosen": chosen, "requested": requested, "reason": reason}

    if baseline_value is not None and target is not None and _meets(baseline_value, target, direction):
        return pick("none", f"baseline near its ceiling: its best {baseline_value:.4g} already meets the target "
                            f"{'>=' if direction == 'max' else '<='} {target:.4g}")
    causes = sorted({f["root_cause"] for f in findings} - NON_ACTIONABLE)
    if not causes:
        seen = sorted({f["root_cause"] for f in findings})
        extra = f" (only {', '.join(seen)})" if seen else ""
        return pick("none", f"baseline near its ceiling / nothing to fix: no actionable finding{extra}")
    ids = ", ".join(f["id"] for f in findings if f["root_cause"] in causes)
    if len(causes) == 1:
        gap = _relative_gap(baseline_value, target, direction)
        if gap is not None and gap > iterative_gap and "iterative" in available:
            return pick("iterative", f"one root cause ({causes[0]}: {ids}) but the baseline {baseline_value:.4g} is "
                                     f"{gap:.1%} short of the target {target:.4g} (> {iterative_gap:.0%}): "
                                     f"promising but insufficient, so refine over rounds")
        return pick("targeted", f"one clear root cause: {causes[0]} ({ids})")
    if "sweep" in available:
        return pick("sweep", f"several root causes: {', '.join(causes)} ({ids})")
    return pick("targeted", f"several root causes: {', '.join(causes)} ({ids}); a sweep would be preferred but is "
                            f"not available, so the ranked recommendations are applied together")


# --- the phase: a run's diagnosis, its recommendations and the patched config ---------------------------------


def plan(exp: dict, run_dir: str | Path, data_ready: Path | None = None) -> dict:
    """Diagnose -> recommend -> patch for the run in `run_dir` (the baseline, or an iterative round's run):
    {findings, recommendations, patch, changes, config, metrics}. The experiment's `optimize.overrides` are
    forced into the patch (after the recommendations) wherever they change the value the config would have, so
    the Phase 3 diagnosis and every iterative round apply them alike."""
    from tunewise.config import get_dotted
    from tunewise.phases.recommend import recommend, to_patch
    from tunewise.runs import RunDir, read_json_if_exists
    from tunewise.trainers import get_spec
    from tunewise.trainers.base import capability

    trainer = get_spec(exp["trainer"])  # knobs and thresholds: no torch in the diagnose job
    metric = exp["metric"]
    history, metrics = load_run(run_dir)
    findings = trainer_findings(trainer, history, metrics, metric, thresholds_for(trainer, exp) or {})
    data_checks = ((read_json_if_exists(data_ready) or {}).get("data_checks") if data_ready else None)
    findings = data_findings(data_checks, findings)
    config = RunDir(run_dir).config()
    recs = recommend(findings, config, trainer.knobs, capability(trainer, "recommendation_patterns")())
    patch, changes = to_patch(recs, config, trainer.knobs, top_n=exp["optimize"]["max_recommendations"])
    for key, value in (exp["optimize"].get("overrides") or {}).items():
        old = get_dotted(config, key)
        if key not in patch and old == value:
            continue  # the config already has it: an override that changes nothing is no recommendation
        changes.append({"knob": key, "key": key, "old": old, "new": value, "action": "set",
                        "rationale": "user override (optimize.overrides)", "expected_impact": "unknown",
                        "risk": "unknown", "effort": "low"})
        patch[key] = value
    return {"findings": findings, "recommendations": recs, "patch": patch, "changes": changes, "config": config,
            "metrics": metrics, "data_checks": data_checks}


def _strategy(exp: dict, findings: list[dict], best: float | None, patch: dict) -> dict:
    strategy = choose_strategy(
        exp["optimize"]["strategy"], findings, best, exp["finalize"]["target"], exp["metric"]["direction"],
        available={"targeted", "sweep", "iterative", "none"}, iterative_gap=exp["optimize"]["iterative"]["choose_gap"],
    )
    previous = (exp.get("round") or {}).get("previous") or {}
    if previous.get("next") == "retry":  # seed 004's C: this round tries the next strategy on the same start
        strategy = {**strategy, "reason": f"round {previous['round']} ended in decision C (no verified improvement): "
                                          f"the next strategy, {strategy['chosen']}, from the same starting config"}
    # a strategy that applies recommendations has nothing to apply without a patch (a sweep searches its space)
    if strategy["chosen"] in ("targeted", "iterative") and not patch:
        strategy = {**strategy, "chosen": "none", "reason": strategy["reason"] + "; but no recommendation maps to a knob of this trainer, so nothing to change"}
    return strategy


def data_findings(data_checks: dict | None, findings: list[dict]) -> list[dict]:
    """What the data checks at preparation doubted (`data_checks.warnings` in ready.json), as findings of root
    cause `data`: no config change answers them, so no recommendation follows. A run that diverged while the
    checks doubted its data is a data problem first: its divergence is not read as a learning rate too high."""
    warnings = list((data_checks or {}).get("warnings") or [])
    if not warnings:
        return findings
    out = []
    for f in findings:
        if f["id"] == "divergence":
            f = {**f, "root_cause": "data", "summary": f"{f['summary']} The data checks doubted the data (see the "
                 "Data section): fix the data before reading this as a learning rate too high."}
        out.append(f)
    out.append(_finding("data_warnings", "data", "medium",
                        f"The data checks at preparation raised {len(warnings)} warning(s): {warnings[0]}"
                        + (" (and more in the Data section)" if len(warnings) > 1 else ""),
                        {"warnings": len(warnings)}))
    return _sorted(out)


def diagnose_run(exp: dict, run_dir: str | Path, out_dir: str | Path, *, report=None, rule: str | None = None,
                 data_ready: Path | None = None) -> dict:
    """Phase 3 of a finished run: diagnosis.json and optimization_config.yaml in `out_dir`, the reports that
    `report(diagnosis_json, run_dir)` writes (it returns their paths), one MLflow `diagnose` run. Returns the
    diagnosis. `data_ready` (the experiment's ready.json) brings the data checks into the diagnosis."""
    from tunewise.phases import tracked
    from tunewise.phases.recommend import apply_patch
    from tunewise.config import commented_config
    from tunewise.runs import RunDir, atomic_write_text, write_json

    run = RunDir(run_dir)
    run.require_finished()
    p = plan(exp, run.path, data_ready)
    findings, patch, metrics = p["findings"], p["patch"], p["metrics"]
    data_checks = p["data_checks"]
    best = metrics["primary"]["best"]
    strategy = _strategy(exp, findings, best, patch)
    out = Path(out_dir)
    atomic_write_text(out / "optimization_config.yaml", commented_config(apply_patch(p["config"], patch), p["changes"]))
    diagnosis = {
        "experiment": exp["name"], "trainer": exp["trainer"], "metric": exp["metric"],
        "baseline": {"run_dir": str(run.path), "status": metrics.get("status"), "best": best,
                     "final": metrics["primary"].get("final"), "best_step": metrics.get("best_step"),
                     "epochs_run": metrics.get("epochs_run")},
        "findings": findings, "recommendations": p["recommendations"], "changes": p["changes"], "patch": patch,
        "strategy": strategy, "data_checks": data_checks,
    }
    write_json(out / "diagnosis.json", diagnosis)
    reports = report(out / "diagnosis.json", run.path) if report else []

    tracker = tracked.tracker(exp)
    run_id = tracked.job_run(tracker, "diagnose", tracked.base_tags(exp, "diagnose", rule, p["config"]),
                             out / "mlflow_run.json")
    tracker.log_params(run_id, {"strategy": strategy["chosen"], "n_findings": len(findings), "patch": json.dumps(patch)})
    tracker.log_metrics(run_id, {"n_findings": len(findings), "n_recommendations": len(p["recommendations"])})
    tracked.log_files(tracker, run_id, [out / "diagnosis.json", out / "optimization_config.yaml", *reports])
    tracker.end_run(run_id)
    causes = sorted({f["root_cause"] for f in findings})
    print(f"diagnosis: {len(findings)} findings ({', '.join(causes) or 'none'}); strategy {strategy['chosen']}: {strategy['reason']}")
    return diagnosis
