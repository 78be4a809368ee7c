"""The latent trainer's own diagnosis: one task head far behind the others (seed 003's multi-task model shares one
latent space among its heads, and a mean R^2 hides a head it serves badly).

Torch-free (numpy and pandas): the diagnose job reads it through the spec (LatentSpec.extra_findings).
"""
from __future__ import annotations

import math

import numpy as np

THRESHOLDS = {
    # a task lags when its validation R^2 at the primary's best step is more than this below the median of the
    # other tasks' (R^2 is a share of variance explained: 0.25 is a quarter of the target's variance)
    "task_r2_gap": 0.25,
}
TASK_PREFIX = "val/r2/"
# how much more weight a lagging task gets: doubling its share of the loss, a step a rerun can judge
TASK_WEIGHT_FACTOR = 2.0


def _r2_at(history, row: int) -> dict[str, float]:
    import pandas as pd

    out = {}
    for column in history.columns:
        if column.startswith(TASK_PREFIX):
            value = pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)[row]
            if math.isfinite(value):
                out[column[len(TASK_PREFIX):]] = float(value)
    return out


def task_findings(history, metrics: dict, thresholds: dict) -> list[dict]:
    """`task_imbalance` (root cause of its own, `task_imbalance`) for the task whose validation R^2 at the best
    step of `val/r2_mean` trails the median of the others by more than `task_r2_gap`; none with fewer than two
    tasks or a run too short to judge."""
    import pandas as pd

    if "val/r2_mean" not in history or len(history) < thresholds["min_rows"]:
        return []
    mean = pd.to_numeric(history["val/r2_mean"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(mean).any():
        return []
    best = int(np.nanargmax(mean))
    r2 = _r2_at(history, best)
    if len(r2) < 2:
        return []
    task = min(r2, key=r2.get)
    others = float(np.median([v for t, v in r2.items() if t != task]))
    gap = others - r2[task]
    if gap <= thresholds["task_r2_gap"]:
        return []
    step = int(history["step"].iloc[best]) if "step" in history else best + 1
    each = ", ".join(f"{t} {v:.3f}" for t, v in sorted(r2.items(), key=lambda kv: kv[1]))
    return [{
        "id": "task_imbalance", "root_cause": "task_imbalance", "severity": "medium",
        "summary": (f"Task {task} lags: its validation R^2 is {r2[task]:.3f} at the best step {step}, {gap:.3f} below "
                    f"the other tasks' median {others:.3f} (threshold {thresholds['task_r2_gap']:g}; per task: {each}). "
                    f"The shared latent space serves it badly; more weight on its loss can help, unless its inputs "
                    f"carry little signal about it, which no weight fixes."),
        "task": task,  # beside the evidence, which holds numbers only: the recommendation needs the name
        "evidence": {"task_r2": r2[task], "others_median_r2": others, "gap": gap, "best_step": step,
                     "task_r2_gap": thresholds["task_r2_gap"], **{f"r2/{t}": v for t, v in r2.items()}},
    }]


def task_weights(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    """Raise the lagging task's entry of `loss.task_weights` (a mapping target -> weight; a target it leaves out
    weighs 1, and None weighs every target 1), keeping the other entries as they are: the knob's new value is the
    whole mapping, so the patch says exactly which weights the next run uses."""
    task = finding.get("task")
    if not task or "task_weights" not in knobs:
        return []
    current = dict(((config.get("loss") or {}).get("task_weights") or {}))
    new = {**current, task: float(f"{float(current.get(task, 1.0)) * TASK_WEIGHT_FACTOR:.6g}")}
    return [("task_weights", "set", new, "medium", "medium", "low",
             f"weigh task {task} x{TASK_WEIGHT_FACTOR:g} in the loss (the other tasks may give a little)")]
