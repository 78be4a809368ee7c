"""The textcaps trainer's own diagnosis (seed 001: GroupDRO and Gaussian anchors), beside the generic rules of
phases/diagnose.py: findings read from the columns the trainer logs each epoch, and the config changes that
answer them. Torch-free: the diagnose job imports the spec, never the trainer;
numpy only inside the rules, so that the spec (imported at the Snakefile parse) stays light.

Columns read (trainer.py's evaluate): val/acc/<group>, val/worst_group_acc, val/avg_acc, groupdro/q_entropy,
groupdro/q_max, q/<group>, train/anchor_fit, val/class_sep, val/confusion_top_share; metrics.json's
val_confusion_pairs (the pairs by name) and objective_from_step (where GroupDRO's warm-up ends).
"""
from __future__ import annotations

import math
import re

THRESHOLDS: dict = {
    # persistent group gap: the best group's validation accuracy above the worst group's by more than this at
    # the end (mean of end_rows) ...
    "group_gap_min": 0.2,
    # ... and the gap shrank by less than this share of its peak: what GroupDRO is for did not happen. On the
    # generator's spurious data ERM keeps a gap of 0.9+ to the end (shrinks 0-5%), GroupDRO at the default eta
    # shrinks it by half or more once its warm-up ends (bench `trust`)
    "group_gap_shrink": 0.25,
    # GroupDRO q collapse: the normalised entropy of q (1 uniform, 0 one group holds all weight) averaged over
    # the end rows below this; two groups at q = (0.97, 0.03) give 0.19
    "q_entropy_min": 0.2,
    # GroupDRO q oscillation: std of the per-epoch changes of any group's q over the rows after warm-up above
    # this (a steady drift of q moves it by a few hundredths per epoch)
    "q_jitter_max": 0.15,
    # anchor fit: the W2 fit loss of the anchors at the end (mean of end_rows) fell by less than this share of
    # its first-epoch value: the latents and their class anchors never met
    "anchor_fit_min_drop": 0.15,
    # class overlap: between-class over within-class scatter of the validation latents at the end below this,
    # and not growing over the second half. Latents that ignore the class measure ~0.02 (400 samples, 64
    # dimensions); 8-epoch runs on the generator's data end at 0.4-0.6, with or without the separation loss
    "class_sep_min": 0.1,
    # confusion concentrated: the 3 most confused class pairs take more than this share of the validation
    # errors (45 pairs of 10 classes: spread evenly, 3 pairs would take 7%)
    "confusion_share_max": 0.5,
}

_GROUP_ACC = re.compile(r"^val/acc/[^/]+$")


def _values(history, column: str):
    import pandas as pd

    return pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)


def _steps(history):
    import numpy as np

    return _values(history, "step") if "step" in history else np.arange(1, len(history) + 1, dtype=float)


def _end(values, rows: int) -> float:
    import numpy as np

    values = values[np.isfinite(values)]
    return float(np.mean(values[-max(1, int(rows)):])) if len(values) else math.nan


def _finding(fid: str, root_cause: str, severity: str, summary: str, evidence: dict) -> dict:
    clean = {k: float(v) for k, v in evidence.items() if v is not None and math.isfinite(float(v))}
    return {"id": fid, "root_cause": root_cause, "severity": severity, "summary": summary, "evidence": clean}


def _after_warmup(history, metrics: dict):
    """The rows from which GroupDRO moves q (the whole history when it has no warm-up, or is off)."""
    start = metrics.get("objective_from_step")
    return history[_steps(history) >= float(start)] if start else history


def group_gap(history, metrics: dict, th: dict) -> list[dict]:
    import numpy as np

    # a group absent from the validation split has no accuracy (nan): it has no gap either
    columns = [c for c in history.columns if _GROUP_ACC.match(c) and np.isfinite(_values(history, c)).any()]
    if len(columns) < 2 or len(history) < th["min_rows"]:
        return []
    accs = np.stack([_values(history, c) for c in columns], axis=1)
    ok = np.isfinite(accs).all(axis=1)
    if ok.sum() < th["min_rows"]:
        return []
    accs, steps = accs[ok], _steps(history)[ok]
    gap = accs.max(axis=1) - accs.min(axis=1)
    end = _end(gap, th["end_rows"])
    peak_i = int(np.argmax(gap))
    peak = float(gap[peak_i])
    shrink = (peak - end) / peak if peak > 0 else 0.0
    if end <= th["group_gap_min"] or shrink >= th["group_gap_shrink"]:
        return []
    final = accs[-max(1, int(th["end_rows"])):].mean(axis=0)
    worst, best = columns[int(np.argmin(final))], columns[int(np.argmax(final))]
    tail = gap[len(gap) // 2:]
    slope = float(np.polyfit(steps[len(gap) // 2:], tail, 1)[0]) if len(tail) >= 2 else math.nan
    return [_finding(
        "group_gap", "group_gap", "high",
        f"The groups' validation accuracies stay apart: {best.rsplit('/', 1)[1]} {final.max():.3f} vs "
        f"{worst.rsplit('/', 1)[1]} {final.min():.3f} at the end, a gap of {end:.3f} (above "
        f"{th['group_gap_min']:.2f}) that shrank only {shrink:.0%} from its peak {peak:.3f} at step "
        f"{int(steps[peak_i])} (less than {th['group_gap_shrink']:.0%}; slope {slope:+.3g} per step over the second "
        f"half): the model still rides the majority's shortcut.",
        {"group_gap_end": end, "group_gap_peak": peak, "group_gap_peak_step": int(steps[peak_i]),
         "group_gap_shrink": shrink, "group_gap_slope": slope, "worst_group_acc_end": float(final.min()),
         "best_group_acc_end": float(final.max()), "group_gap_min": th["group_gap_min"]},
    )]


def q_instability(history, metrics: dict, th: dict) -> list[dict]:
    import numpy as np

    if "groupdro/q_entropy" not in history:
        return []
    rows = _after_warmup(history, metrics)
    if len(rows) < 2:
        return []
    entropy = _values(rows, "groupdro/q_entropy")
    end = _end(entropy, th["end_rows"])
    qmax = _end(_values(rows, "groupdro/q_max"), th["end_rows"]) if "groupdro/q_max" in rows else None
    found = []
    if math.isfinite(end) and end < th["q_entropy_min"]:
        found.append(_finding(
            "groupdro_q_collapse", "groupdro_unstable", "high",
            f"GroupDRO's weights collapsed onto one group: the normalised entropy of q averaged {end:.3f} over the "
            f"last {int(th['end_rows'])} steps (below {th['q_entropy_min']:.2f}; 1 is uniform), the largest q "
            f"{qmax if qmax is not None else math.nan:.3f}: the other groups no longer train, the step size eta is "
            f"too large.",
            {"q_entropy_end": end, "q_max_end": qmax, "q_entropy_min": th["q_entropy_min"]},
        ))
    q_cols = [c for c in rows.columns if c.startswith("q/")]
    if len(rows) >= 3 and q_cols:
        jitter = {c: float(np.nanstd(np.diff(_values(rows, c)))) for c in q_cols}
        worst = max(jitter, key=jitter.get)
        if jitter[worst] > th["q_jitter_max"]:
            found.append(_finding(
                "groupdro_q_oscillation", "groupdro_unstable", "medium",
                f"GroupDRO's weights swing between epochs: {worst} changes by {jitter[worst]:.3f} (std of per-epoch "
                f"changes after warm-up, above {th['q_jitter_max']:.2f}): each update overshoots, the step size "
                f"eta is too large.",
                {"q_change_std": jitter[worst], "q_jitter_max": th["q_jitter_max"], "q_entropy_end": end},
            ))
    return found


def anchor_fit(history, metrics: dict, th: dict) -> list[dict]:
    import numpy as np

    if "train/anchor_fit" not in history or len(history) < th["min_rows"]:
        return []
    fit = _values(history, "train/anchor_fit")
    fit = fit[np.isfinite(fit)]
    if len(fit) < th["min_rows"] or fit[0] <= 0:
        return []
    end = _end(fit, th["end_rows"])
    drop = (fit[0] - end) / fit[0]
    if drop >= th["anchor_fit_min_drop"]:
        return []
    return [_finding(
        "anchor_fit_stalled", "anchor_fit", "medium",
        f"The anchor fit loss (squared W2 between each class's latents and its Gaussian anchor) ended at {end:.4g} "
        f"against {fit[0]:.4g} in the first epoch, a drop of {drop:.0%} (less than "
        f"{th['anchor_fit_min_drop']:.0%}; lowest {fit.min():.4g}): the anchors do not shape the latent space.",
        {"anchor_fit_first": float(fit[0]), "anchor_fit_end": end, "anchor_fit_min": float(fit.min()),
         "anchor_fit_drop": drop, "anchor_fit_min_drop": th["anchor_fit_min_drop"]},
    )]


def class_overlap(history, metrics: dict, th: dict) -> list[dict]:
    import numpy as np

    if "val/class_sep" not in history or len(history) < th["min_rows"]:
        return []
    sep, steps = _values(history, "val/class_sep"), _steps(history)
    ok = np.isfinite(sep)
    sep, steps = sep[ok], steps[ok]
    if len(sep) < th["min_rows"]:
        return []
    end = _end(sep, th["end_rows"])
    half = len(sep) // 2
    slope = float(np.polyfit(steps[half:], sep[half:], 1)[0])
    if end >= th["class_sep_min"] or slope > 0:
        return []
    return [_finding(
        "class_overlap", "class_overlap", "low",
        f"The classes overlap in the latent space: between-class over within-class scatter of the validation "
        f"latents is {end:.3g} at the end (below {th['class_sep_min']:.3g}) and did not grow over the second half "
        f"(slope {slope:+.3g} per step).",
        {"class_sep_end": end, "class_sep_max": float(sep.max()), "class_sep_slope": slope,
         "class_sep_min": th["class_sep_min"]},
    )]


def confusion_concentration(history, metrics: dict, th: dict) -> list[dict]:
    import numpy as np

    if "val/confusion_top_share" not in history or len(history) < th["min_rows"]:
        return []
    end = _end(_values(history, "val/confusion_top_share"), th["end_rows"])
    if not math.isfinite(end) or end <= th["confusion_share_max"]:
        return []
    pairs = metrics.get("val_confusion_pairs") or []
    named = "; ".join(f"{' / '.join(p['classes'])} ({p['errors']} errors)" for p in pairs)
    evidence = {"confusion_top_share_end": end, "confusion_share_max": th["confusion_share_max"]}
    evidence.update({f"pair{i + 1}_errors": p["errors"] for i, p in enumerate(pairs)})
    return [_finding(
        "confusion_pairs", "data", "low",
        f"Most validation errors fall on a few class pairs: the 3 most confused pairs take {end:.0%} of them at the "
        f"end (above {th['confusion_share_max']:.0%})" + (f"; at the best step: {named}" if named else "")
        + ". No knob of this trainer answers it alone: look at these classes' data (labels, look-alike images).",
        evidence,
    )]


RULES = (group_gap, q_instability, anchor_fit, class_overlap, confusion_concentration)


def findings(history, metrics: dict, thresholds: dict) -> list[dict]:
    """The textcaps findings of one run (history.csv, metrics.json); `thresholds` are the merged ones."""
    if metrics.get("status") == "diverged" or history is None or not len(history):
        return []  # the generic divergence finding says it all
    th = {**THRESHOLDS, **thresholds}
    return [f for rule in RULES for f in rule(history, metrics, th)]


# --- recommendations: (knob, action, value, impact, risk, effort, why), as phases/recommend.py's patterns ---


def _current(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _group_gap(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    if not _current(config, "groupdro.enabled"):
        return [("groupdro", "set", True, "high", "low", "low",
                 "switch GroupDRO on: it weights the worst group's loss up")]
    out = [("groupdro_eta", "scale", 3.0, "high", "medium", "low",
            "raise GroupDRO's step size so q moves to the worst group sooner")]
    warmup = _current(config, "groupdro.warmup_epochs")
    if isinstance(warmup, int) and warmup > 1:
        out.append(("groupdro_warmup", "set", 1, "medium", "low", "low",
                    "shorten GroupDRO's warm-up (ERM there learns the shortcut first)"))
    return out


def _groupdro_unstable(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    return [("groupdro_eta", "scale", 0.1, "high", "low", "low", "lower GroupDRO's step size eta")]


def _anchor_fit(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    weight = _current(config, "anchors.lambda_fit")
    if not weight:
        return [("lambda_fit", "set", 1e-2, "medium", "low", "low", "give the anchor fit loss a weight")]
    return [("lambda_fit", "scale", 10.0, "medium", "low", "low", "raise the anchor fit weight lambda_fit")]


def _class_overlap(finding: dict, config: dict, knobs: dict) -> list[tuple]:
    weight = _current(config, "anchors.lambda_sep")
    if not weight:
        return [("lambda_sep", "set", 1e-2, "medium", "medium", "low", "give the anchor separation loss a weight")]
    return [("lambda_sep", "scale", 10.0, "medium", "medium", "low", "raise the anchor separation weight lambda_sep")]


PATTERNS = {
    "group_gap": _group_gap,
    "groupdro_unstable": _groupdro_unstable,
    "anchor_fit": _anchor_fit,
    "class_overlap": _class_overlap,
}
