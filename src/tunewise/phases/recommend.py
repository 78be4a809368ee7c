"""Phase 3 -> 4: turn diagnosis findings into ranked recommendations and a config patch.

Recommendations follow seed 004's "Common Optimization Patterns" and reference/methods.md. They speak in the
trainer's knobs (semantic names mapped to dotted config keys), so one engine serves every trainer; a knob the
trainer lacks, or a change that would leave the config as it is, is skipped.
"""
from __future__ import annotations

import copy
import math
from typing import Any

from tunewise.config import get_dotted, set_dotted

LEVELS = {"high": 0, "medium": 1, "low": 2}
# for effort and risk, lower is better, so "low" ranks first
COSTS = {"low": 0, "medium": 1, "high": 2}


def apply_patch(config: dict, patch: dict) -> dict:
    """A deep copy of `config` with `{dotted_key: value}` applied; the input is left untouched."""
    out = copy.deepcopy(config)
    for key, value in patch.items():
        set_dotted(out, key, copy.deepcopy(value))
    return out


def _keys(knobs: dict, knob: str) -> list[str]:
    keys = knobs[knob]
    return list(keys) if isinstance(keys, (list, tuple)) else [keys]


def _current(config: dict, key: str) -> Any:
    try:
        return get_dotted(config, key)
    except KeyError:
        return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaled(value: Any, factor: float) -> Any:
    """`value * factor`; ints stay ints (at least 1), lists scale element-wise; None when it cannot scale."""
    if isinstance(value, list):
        items = [_scaled(v, factor) for v in value]
        return None if any(v is None for v in items) else items
    if not _number(value):
        return None
    if isinstance(value, int):
        # half up, not Python's half-to-even: 5 * 0.5 -> 3, as a person would round a layer width
        return max(1, math.floor(value * factor + 0.5))
    # six significant digits keep 3 * 0.001 from writing 0.0030000000000000005 into a config
    return float(f"{value * factor:.6g}")


def _new_value(current: Any, action: str, value: Any) -> Any:
    return _scaled(current, value) if action == "scale" else value


def _evidence_text(finding: dict) -> str:
    parts = []
    for name, number in (finding.get("evidence") or {}).items():
        parts.append(f"{name}={number:.4g}" if isinstance(number, float) else f"{name}={number}")
    return ", ".join(parts)


# --- the patterns: one function per root cause, each yielding (knob, action, value, impact, risk, effort, why) --


def _overfitting(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    out = []
    dropout = _current(config, _keys(knobs, "dropout")[0]) if "dropout" in knobs else None
    if _number(dropout) or dropout is None:
        out.append(("dropout", "set", max(float(dropout or 0.0), 0.3), "high", "low", "low", "regularise with dropout"))
    wd = _current(config, _keys(knobs, "weight_decay")[0]) if "weight_decay" in knobs else None
    if not wd:
        out.append(("weight_decay", "set", 1e-4, "medium", "low", "low", "add weight decay"))
    elif _number(wd):
        out.append(("weight_decay", "scale", 10.0, "medium", "low", "low", "strengthen weight decay"))
    aug = _current(config, _keys(knobs, "augmentation")[0]) if "augmentation" in knobs else None
    if isinstance(aug, bool):
        out.append(("augmentation", "set", True, "medium", "low", "low", "enable data augmentation"))
    elif _number(aug):
        out.append(("augmentation", *(("set", 0.05) if aug == 0 else ("scale", 2.0)), "medium", "low", "low",
                    "augment the training data"))
    patience = _current(config, _keys(knobs, "patience")[0]) if "patience" in knobs else None
    # early stopping only helps when it stops sooner than now: never raise an existing patience
    if patience is None or (_number(patience) and patience > 5):
        out.append(("patience", "set", 5, "low", "low", "low", "stop early once validation stops improving"))
    out.append(("capacity", "scale", 0.5, "medium", "medium", "low", "reduce model capacity"))
    return out


# one step of the learning rate: half a decade, what a log grid of the LR moves by. Seed 004 raises a too-low LR
# 10x at once; from a poor flat curve whose cause may also be capacity, one step is the safer move, and the next
# diagnosis asks again
LR_STEP = 3.0


def _underfitting(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    out = [
        ("capacity", "scale", 2.0, "high", "medium", "medium", "increase model capacity"),
        ("lr", "scale", LR_STEP, "high", "medium", "low",
         f"raise the learning rate by one step (x{LR_STEP:g}): the training metric itself is poor and flat"),
        ("epochs", "scale", 2.0, "medium", "low", "medium", "train longer"),
    ]
    # less regularisation, only where there is some to remove
    dropout = _current(config, _keys(knobs, "dropout")[0]) if "dropout" in knobs else None
    if _number(dropout) and dropout > 0:
        out.append(("dropout", "scale", 0.5, "medium", "low", "low", "remove excess dropout"))
    wd = _current(config, _keys(knobs, "weight_decay")[0]) if "weight_decay" in knobs else None
    if _number(wd) and wd > 0:
        out.append(("weight_decay", "scale", 0.1, "low", "low", "low", "remove excess weight decay"))
    return out


# |delta theta| / |theta| per step to aim at: CS231n says about 1e-3; the trainers' default LRs measure 2-4e-3
# (3.3e-3 for the classifier, 2-4e-3 for the regressor over 6 epochs) and train well, so aim between the two
HEALTHY_UPDATE_RATIO = 2.5e-3


def _lr_too_high(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    mild = finding["id"] in ("loss_oscillation", "grad_clipping")
    factor = 0.3 if mild else 0.1
    ratio = (finding.get("evidence") or {}).get("update_ratio_median")
    if finding["id"] == "large_updates" and ratio:
        # the step size scales about linearly with the LR (Adam: exactly, far from convergence): aim at ~1e-3
        factor = float(f"{min(0.5, max(0.1, HEALTHY_UPDATE_RATIO / ratio)):.2g}")
    out = [("lr", "scale", factor, "medium" if mild else "high", "low", "low", "lower the learning rate")]
    warmup = _current(config, _keys(knobs, "warmup")[0]) if "warmup" in knobs else None
    if not warmup:
        out.append(("warmup", "set", 2, "medium", "low", "low", "warm the learning rate up"))
    clip = _current(config, _keys(knobs, "grad_clip")[0]) if "grad_clip" in knobs else None
    # with clipping already on (and >50% of steps clipped) the cure is a lower LR, not a looser bound
    if clip is None and finding["id"] != "grad_clipping":
        p90 = (finding.get("evidence") or {}).get("grad_norm_p90")
        bound = float(f"{p90:.3g}") if p90 else 1.0
        out.append(("grad_clip", "set", bound, "medium", "low", "low",
                    "clip gradients at their 90th-percentile norm" if p90 else "clip gradients"))
    return out


def _lr_too_low(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    return [
        ("epochs", "scale", 2.0, "high", "low", "medium", "train longer"),
        ("lr", "scale", LR_STEP, "medium", "medium", "low", "raise the learning rate"),
    ]


def _too_short(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    """A run too short to judge: enough steps for at least twice the rows the diagnosis needs."""
    evidence = finding.get("evidence") or {}
    rows, need = evidence.get("rows") or 0, evidence.get("min_rows") or 4
    factor = float(min(10, max(2, math.ceil(2 * need / rows)))) if rows else 4.0
    return [("epochs", "scale", factor, "medium", "low", "medium",
             f"train longer (x{factor:g}): the run is too short to judge")]


# schedule.name values that are already a schedule (train/options.py SCHEDULES): the plateau advice adds one only
# where there is none
_NO_SCHEDULE = (None, "none")


def _scheduler(config: dict, knobs: dict, name: str, why: str) -> list[tuple]:
    if "scheduler" not in knobs or _current(config, _keys(knobs, "scheduler")[0]) not in _NO_SCHEDULE:
        return []
    return [("scheduler", "set", name, "medium", "low", "low", why)]


def _early_plateau(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    # seed 004, pattern 3: a plateau calls for a schedule. Validation stalling mid-run while the training loss
    # falls: reduce-on-plateau (the shared Schedule's "plateau", torch's ReduceLROnPlateau) lowers the LR at the
    # stall it waits for. A best step in the first 10%: the run is also shortened below, and cosine decays over
    # whatever length it gets without waiting `schedule.patience` epochs of a short run first
    if finding["id"] == "best_step_early":
        out = _scheduler(config, knobs, "cosine", "decay the learning rate over the run (cosine)")
    else:
        out = _scheduler(config, knobs, "plateau", "lower the learning rate when validation stalls (ReduceLROnPlateau)")
    best_step = (finding.get("evidence") or {}).get("best_step")
    epochs = _current(config, _keys(knobs, "epochs")[0]) if "epochs" in knobs else None
    if best_step is not None and _number(epochs):
        shorter = max(2 * int(best_step), 5)
        # saturated early means fewer steps: never lengthen training from this finding
        if shorter < epochs:
            out.append(("epochs", "set", shorter, "low", "low", "low", "train for fewer epochs"))
    patience = _current(config, _keys(knobs, "patience")[0]) if "patience" in knobs else None
    if patience is None or (_number(patience) and patience > 5):
        out.append(("patience", "set", 5, "low", "low", "low", "stop early once validation stops improving"))
    return out


def _noisy(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    return [
        ("lr", "scale", 0.5, "medium", "low", "low", "lower the learning rate to steady the updates"),
        ("batch_size", "scale", 2.0, "medium", "medium", "low", "average gradients over larger batches"),
    ]


def _resources(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    return [("batch_size", "scale", 2.0, "low", "medium", "low", "fewer, larger batches per epoch")]


PATTERNS = {
    "overfitting": _overfitting,
    "underfitting": _underfitting,
    "lr_too_high": _lr_too_high,
    "lr_too_low": _lr_too_low,
    "early_plateau": _early_plateau,
    "too_short": _too_short,
    "noisy": _noisy,
    "resources": _resources,
}


def _describe(knob: str, keys: list[str], olds: list, news: list) -> str:
    moves = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in zip(keys, olds, news) if old != new)
    return f"{knob}: {moves}"


def _rank_key(rec: dict, severity: str, order: int) -> tuple:
    return (LEVELS[rec["expected_impact"]], COSTS[rec["effort"]], COSTS[rec["risk"]], LEVELS.get(severity, 3), order)


def recommend(findings: list[dict], config: dict, knobs: dict, patterns: dict | None = None) -> list[dict]:
    """Ranked recommendations `{knob, action, value, rationale, expected_impact, risk, effort, root_cause,
    finding_id}` for the findings, in this trainer's knobs.

    `value` is the new value for `set` and the factor for `scale`. Ranked by impact (high first), effort and
    risk (low first), then the finding's severity; one recommendation per knob (the best-ranked one, with the
    rationales of the others appended). `patterns` are a trainer's own ({root_cause: pattern}, its
    `recommendation_patterns`): for the root causes of its own findings, or replacing a generic pattern.
    """
    patterns = {**PATTERNS, **(patterns or {})}
    candidates: list[tuple[tuple, dict]] = []
    for finding in findings:
        pattern = patterns.get(finding["root_cause"])
        if pattern is None:
            continue
        for knob, action, value, impact, risk, effort, why in pattern(finding, config, knobs):
            if knob not in knobs:
                continue
            keys = _keys(knobs, knob)
            olds = [_current(config, k) for k in keys]
            news = [_new_value(old, action, value) for old in olds]
            if any(new is None for new in news) or all(new == old for new, old in zip(news, olds)):
                continue
            rec = {
                "knob": knob, "action": action, "value": value,
                "rationale": f"{why} ({_describe(knob, keys, olds, news)}): {finding['id']} ({_evidence_text(finding)})",
                "expected_impact": impact, "risk": risk, "effort": effort,
                "root_cause": finding["root_cause"], "finding_id": finding["id"],
            }
            candidates.append((_rank_key(rec, finding.get("severity", "low"), len(candidates)), rec))
    ranked: list[dict] = []
    by_knob: dict[str, dict] = {}
    for _, rec in sorted(candidates, key=lambda c: c[0]):
        kept = by_knob.get(rec["knob"])
        if kept is None:
            by_knob[rec["knob"]] = rec
            ranked.append(rec)
        else:
            kept["rationale"] += f"; also suggested by {rec['finding_id']}: {rec['rationale']}"
    return ranked


def to_patch(recommendations: list[dict], config: dict, knobs: dict, top_n: int = 4) -> tuple[dict, list[dict]]:
    """Apply the first `top_n` recommendations that change the config.

    Returns the patch `{dotted_key: new_value}` and the change list `[{knob, key, old, new, action, rationale,
    expected_impact, risk, effort}]`; a knob mapped to several keys changes each of them.
    """
    patch: dict = {}
    changes: list[dict] = []
    applied = 0
    for rec in recommendations:
        if applied >= top_n:
            break
        if rec["knob"] not in knobs:
            continue
        rec_changes = []
        for key in _keys(knobs, rec["knob"]):
            if key in patch:
                continue
            old = _current(config, key)
            new = _new_value(old, rec["action"], rec["value"])
            if new is None or new == old:
                continue
            rec_changes.append({"knob": rec["knob"], "key": key, "old": old, "new": new, "action": rec["action"],
                                **{k: rec.get(k) for k in ("rationale", "expected_impact", "risk", "effort")}})
        if rec_changes:
            applied += 1
            changes.extend(rec_changes)
            patch.update({c["key"]: c["new"] for c in rec_changes})
    return patch, changes
