"""The pez trainer's own diagnosis (seed 000: "monitor gradient norms", "log the optimization path"): its
findings from the prompt churn a run logs, and the recommendations they call for.

PEZ moves a soft prompt and scores its projection onto the nearest vocabulary rows, so the learning rate shows
in how many projected tokens change per step (`train/token_change`, the mean over a history row's steps; the
share that differs between logged rows is `train/prompt_churn`):
- prompts that never settle (a large share of tokens still flipping every step at the end) search by random
  walk: the step is far larger than the distance between neighbouring token rows;
- prompts that stop changing while the gradient is not zero: each step is too small to carry a token across to
  another nearest row, so the search is stuck where it stands.

Torch-free (numpy and pandas): the diagnose job reads it through the spec (PezSpec.extra_findings).
"""
from __future__ import annotations

import math

import numpy as np

# measured on the embedded shapes and a tiny CLIP (20 targets of 8 tokens, 100 steps, 10 seeds per learning rate,
# bench/trust_pez.py): the share of tokens changing per step in the last history rows is 0.065-0.106 at the
# reference's lr 0.1, 0.11-0.18 at 1.0 (the top of pez.lr's search space), 0.31-0.36 at 10, 0.02-0.05 at 0.003
# (40 steps) and exactly 0 at 1e-4, where no token ever moves
THRESHOLDS = {
    # prompts keep churning: mean share of prompt tokens changing per step over the last tail_frac of rows above this
    "prompt_churn_high": 0.2,
    # prompts frozen: the share changing per step at or below this on every one of the trailing
    # prompt_freeze_frac of rows (one token of 20 prompts of 8 changing once in a 5-step row is 0.00125) ...
    "prompt_freeze_change": 0.002,
    "prompt_freeze_frac": 0.5,
}


def _values(history, column: str) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)


def _finding(fid: str, root_cause: str, severity: str, summary: str, evidence: dict) -> dict:
    clean = {k: float(v) if not isinstance(v, int) else v for k, v in evidence.items()
             if v is not None and math.isfinite(float(v))}
    return {"id": fid, "root_cause": root_cause, "severity": severity, "summary": summary, "evidence": clean}


def _grad_end(history, rows: int) -> float | None:
    if "grad_norm" not in history:
        return None
    norm = _values(history, "grad_norm")[-rows:]
    norm = norm[np.isfinite(norm)]
    return float(norm.mean()) if len(norm) else None


def _steps(history) -> np.ndarray:
    return _values(history, "step") if "step" in history else np.arange(1, len(history) + 1, dtype=float)


def prompt_findings(history, metrics: dict, thresholds: dict) -> list[dict]:
    """`prompt_churn` (lr_too_high) and `prompt_freeze` (lr_too_low) from `train/token_change`; none for a run too
    short to judge (the generic `insufficient_history` says so) or one without the column."""
    n = len(history)
    if "train/token_change" not in history or n < thresholds["min_rows"]:
        return []
    change = _values(history, "train/token_change")
    if not np.isfinite(change).all():
        return []
    steps = _steps(history)
    tail = max(1, math.ceil(thresholds["tail_frac"] * n))
    end = float(change[-tail:].mean())
    churn = _values(history, "train/prompt_churn") if "train/prompt_churn" in history else None
    churn_end = float(np.nanmean(churn[-tail:])) if churn is not None and np.isfinite(churn[-tail:]).any() else None
    grad = _grad_end(history, tail)
    grad_text = f"; the prompt gradient's norm is {grad:.3g} there" if grad is not None else ""
    found = []
    if end > thresholds["prompt_churn_high"]:
        between = (f" ({churn_end:.0%} differ between logged rows)" if churn_end is not None else "")
        found.append(_finding(
            "prompt_churn", "lr_too_high", "medium",
            f"The prompts keep churning at the end: {end:.0%} of their tokens change every step over the last {tail} "
            f"rows (above {thresholds['prompt_churn_high']:.0%}){between}{grad_text}. Each step jumps past "
            f"neighbouring tokens, so the search wanders instead of refining: the learning rate is too high.",
            {"token_change_end": end, "prompt_churn_end": churn_end, "prompt_churn_high": thresholds["prompt_churn_high"],
             "grad_norm_end": grad},
        ))
    span = max(1, math.ceil(thresholds["prompt_freeze_frac"] * n))
    limit = thresholds["prompt_freeze_change"]
    if (change[-span:] <= limit).all():
        moving = np.nonzero(change > limit)[0]
        never = not len(moving)
        since = int(steps[0]) if never else int(steps[moving[-1] + 1])
        where = ("never moved from their random start" if never else
                 f"stopped changing at step {since} of {int(steps[-1])}")
        # a gradient that is there but moves nothing: the step, not the signal, is missing
        stuck = f" although the gradient is not zero (norm {grad:.3g})" if grad is not None and grad > 0 else ""
        found.append(_finding(
            "prompt_freeze", "lr_too_low", "high" if never else "medium",
            f"The prompts {where}: at most {limit:.1%} of their tokens changed per step over the last {span} rows"
            f"{stuck}. Each step is too small to carry a token to another nearest row, so the search is stuck: the "
            f"learning rate is too low.",
            {"token_change_end": float(change[-span:].mean()), "frozen_from_step": since, "never_moved": int(never),
             "prompt_freeze_change": limit, "grad_norm_end": grad},
        ))
    return found


# one decade: a frozen search moves nothing at all, so the half-decade step of an underfit model is too timid
FREEZE_LR_FACTOR = 10.0


def lr_too_low(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    """Frozen prompts: a larger step first (more steps of the same size move nothing). Otherwise the generic
    pattern (phases/recommend.py `_lr_too_low`, which a trainer's pattern replaces for its root cause)."""
    if finding["id"] == "prompt_freeze":
        return [("lr", "scale", FREEZE_LR_FACTOR, "high", "low", "low",
                 f"raise the learning rate x{FREEZE_LR_FACTOR:g}: the steps are too small to change any token")]
    return [
        ("epochs", "scale", 2.0, "high", "low", "medium", "train longer"),
        ("lr", "scale", 3.0, "medium", "medium", "low", "raise the learning rate"),
    ]
