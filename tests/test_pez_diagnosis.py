"""The pez trainer's own diagnosis (trainers/pez/diagnosis.py): prompts that keep churning or freeze, on synthetic
histories shaped like the runs the trust bench measures, through the spec as the diagnose job calls it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tunewise.phases.diagnose import thresholds_for, trainer_findings
from tunewise.phases.recommend import recommend, to_patch
from tunewise.trainers import get_spec
from tunewise.trainers.base import capability

SPEC = get_spec("pez")
METRIC = {"name": "val/caption_ratio", "direction": "max"}
N = 20


def run(ratio, token_change, churn=None, grad=None, loss=None) -> pd.DataFrame:
    n = len(ratio)
    frame = pd.DataFrame({
        "step": np.arange(1, n + 1) * 10,
        "train/loss": np.linspace(0.5, 0.15, n) if loss is None else loss,
        "train/similarity": np.asarray(ratio) * 0.3,
        "val/similarity": np.asarray(ratio) * 0.3,
        "val/caption_ratio": ratio,
        "grad_norm": np.full(n, 1.7) if grad is None else grad,
        "train/token_change": token_change,
    })
    if churn is not None:
        frame["train/prompt_churn"] = churn
    return frame


def rising(start=0.6, end=1.0, tau=3.0, n=N) -> np.ndarray:
    return np.maximum.accumulate(end + (start - end) * np.exp(-np.arange(n) / tau))


def healthy() -> pd.DataFrame:
    """lr 0.1 on the embedded data: most of the gain early, about a tenth of the tokens moving each step."""
    rng = np.random.default_rng(0)
    return run(rising(), 0.08 + 0.02 * rng.standard_normal(N), churn=np.r_[np.nan, np.full(N - 1, 0.3)],
               grad=1.7 + 0.2 * rng.standard_normal(N), loss=0.15 + 0.03 * rng.standard_normal(N))


def diagnose(history, metrics=None) -> list[dict]:
    metrics = {"status": "done", "epochs_planned": N * 10, "epochs_run": len(history), **(metrics or {})}
    return trainer_findings(SPEC, history, metrics, METRIC, thresholds_for(SPEC, {}) or {})


def ids(findings) -> list[tuple[str, str]]:
    return [(f["id"], f["root_cause"]) for f in findings]


def test_a_healthy_search_has_no_findings():
    assert diagnose(healthy()) == []


def test_prompts_that_keep_churning_are_lr_too_high():
    h = healthy()
    h["train/token_change"] = np.full(N, 0.35)
    h["train/prompt_churn"] = np.r_[np.nan, np.full(N - 1, 0.6)]
    findings = diagnose(h)
    assert ids(findings) == [("prompt_churn", "lr_too_high")]
    ev = findings[0]["evidence"]
    assert ev["token_change_end"] == pytest.approx(0.35) and ev["prompt_churn_end"] == pytest.approx(0.6)
    assert ev["prompt_churn_high"] == 0.2 and ev["grad_norm_end"] > 1
    assert "keep churning" in findings[0]["summary"]
    # the recommendation: the generic lower-the-LR pattern, in pez's knob
    patch, _ = to_patch(recommend(findings, SPEC.default_config(), SPEC.knobs,
                                  capability(SPEC, "recommendation_patterns")()), SPEC.default_config(), SPEC.knobs)
    assert patch == {"pez.lr": pytest.approx(0.01)}


def test_churn_at_the_top_of_the_search_space_is_not_flagged():
    h = healthy()
    h["train/token_change"] = np.full(N, 0.16)  # lr 1.0
    assert diagnose(h) == []


def test_prompts_that_never_move_are_lr_too_low_and_call_for_a_decade_more_lr():
    h = run(np.full(N, 0.214), np.zeros(N), churn=np.r_[np.nan, np.zeros(N - 1)], grad=np.full(N, 5.43),
            loss=np.full(N, 0.797))
    findings = diagnose(h)
    freeze = next(f for f in findings if f["id"] == "prompt_freeze")
    assert (freeze["root_cause"], freeze["severity"]) == ("lr_too_low", "high")
    assert freeze["evidence"]["never_moved"] == 1 and freeze["evidence"]["grad_norm_end"] == pytest.approx(5.43)
    assert "never moved" in freeze["summary"] and "not zero" in freeze["summary"]
    recs = recommend(findings, SPEC.default_config(), SPEC.knobs, capability(SPEC, "recommendation_patterns")())
    assert (recs[0]["knob"], recs[0]["action"], recs[0]["value"], recs[0]["expected_impact"]) == ("lr", "scale", 10.0, "high")
    patch, _ = to_patch(recs, SPEC.default_config(), SPEC.knobs)
    assert patch["pez.lr"] == pytest.approx(1.0)


def test_prompts_that_stop_moving_halfway_are_medium():
    change = np.r_[np.full(8, 0.05), np.zeros(N - 8)]
    ratio = np.r_[rising(n=8), np.full(N - 8, 1.0)]
    freeze = next(f for f in diagnose(run(ratio, change)) if f["id"] == "prompt_freeze")
    assert freeze["severity"] == "medium" and freeze["evidence"]["frozen_from_step"] == 90
    assert "stopped changing at step 90" in freeze["summary"]


def test_a_late_freeze_or_a_rare_flip_is_not_a_freeze():
    change = np.r_[np.full(14, 0.05), np.zeros(N - 14)]  # the last 6 of 20 rows: less than the trailing half
    assert "prompt_freeze" not in [f["id"] for f in diagnose(run(rising(), change))]
    rare = np.full(N, 0.00125)  # one token of 20 prompts of 8 changing once in a 5-step row: still moving
    rare[1::2] = 0.004
    assert "prompt_freeze" not in [f["id"] for f in diagnose(run(rising(), rare))]


def test_other_lr_too_low_findings_keep_the_generic_advice():
    still = {"id": "still_improving", "root_cause": "lr_too_low", "severity": "medium", "summary": "", "evidence": {}}
    recs = recommend([still], SPEC.default_config(), SPEC.knobs, capability(SPEC, "recommendation_patterns")())
    assert [(r["knob"], r["value"]) for r in recs] == [("epochs", 2.0), ("lr", 3.0)]


def test_short_or_old_histories_get_no_prompt_findings():
    assert [f["id"] for f in diagnose(run(rising(n=3), np.zeros(3)))] == ["insufficient_history"]
    old = healthy().drop(columns=["train/token_change"])  # a run from before the column
    assert diagnose(old) == []


def test_a_rising_pez_loss_needs_half_its_range():
    # the loss at the projected prompts wanders up in a healthy search (26% of its range at lr 0.1, 200 steps)
    h = healthy()
    h["train/loss"] = np.r_[np.linspace(0.3, 0.11, 6), 0.11 + 0.19 * 0.3 * np.linspace(0, 1, N - 6)]
    assert diagnose(h) == []
    h["train/loss"] = np.r_[np.linspace(0.3, 0.11, 6), 0.11 + 0.19 * 0.9 * np.linspace(0, 1, N - 6)]
    assert ("rising_train_loss", "lr_too_high") in ids(diagnose(h))


def test_vanishing_and_exploding_gradient_rules_read_pez_s_gradient_norm():
    h = healthy()
    h["grad_norm"] = np.r_[np.full(10, 1.7), np.geomspace(1.7, 60.0, N - 10)]
    assert ("exploding_gradients", "lr_too_high") in ids(diagnose(h))
    h = run(np.r_[rising(n=6), np.full(N - 6, 0.7)], np.full(N, 0.05), grad=np.geomspace(2.0, 1e-4, N))
    # caption_ratio is not a bounded metric with a known good-enough, so a stalled metric is what the rule asks
    assert ("vanishing_gradients", "underfitting") in ids(diagnose(h))


def test_the_spec_stays_torch_free_and_declares_its_thresholds():
    own = set(SPEC.diagnosis_thresholds)
    assert {"prompt_churn_high", "prompt_freeze_change", "prompt_freeze_frac"} <= own
    assert "train/prompt_churn" in SPEC.metric_names(SPEC.default_config())
