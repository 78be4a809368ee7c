"""The latent trainer's own diagnosis (trainers/latent/diagnosis.py): a task head far behind the others, and the
recommendation that weighs it more in `loss.task_weights`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tunewise.phases.diagnose import thresholds_for, trainer_findings
from tunewise.phases.recommend import apply_patch, recommend, to_patch
from tunewise.trainers import get_spec
from tunewise.trainers.base import capability

SPEC = get_spec("latent")
METRIC = {"name": "val/r2_mean", "direction": "max"}
N = 30


def curve(end: float, n: int = N) -> np.ndarray:
    return end * (1 - np.exp(-np.arange(1, n + 1) / 4))


def history(per_task: dict[str, float], n: int = N) -> pd.DataFrame:
    """Each task's R^2 rising to its end value; train slightly above val; the training loss levelling off."""
    frame = {"step": np.arange(1, n + 1), "train/loss": 0.2 + 2 * np.exp(-np.arange(n) / 4)}
    for split, lift in (("train", 0.02), ("val", 0.0)):
        for task, end in per_task.items():
            frame[f"{split}/r2/{task}"] = curve(end + lift, n)
        frame[f"{split}/r2_mean"] = np.mean([frame[f"{split}/r2/{t}"] for t in per_task], axis=0)
    return pd.DataFrame(frame)


def config(weights=None) -> dict:
    cfg = SPEC.default_config()
    cfg["data"]["targets"] = ["S_p", "PF_p", "kappa_p"]
    cfg["loss"]["task_weights"] = weights
    return cfg


def diagnose(h: pd.DataFrame) -> list[dict]:
    return trainer_findings(SPEC, h, {"status": "done", "epochs_planned": N}, METRIC, thresholds_for(SPEC, {}) or {})


def imbalance(findings) -> dict | None:
    return next((f for f in findings if f["id"] == "task_imbalance"), None)


def test_a_lagging_task_head_is_named_with_every_task_s_numbers():
    f = imbalance(diagnose(history({"S_p": 0.92, "PF_p": 0.35, "kappa_p": 0.9})))
    assert f is not None and (f["root_cause"], f["severity"], f["task"]) == ("task_imbalance", "medium", "PF_p")
    ev = f["evidence"]
    assert ev["task_r2"] == pytest.approx(0.35, abs=0.01) and ev["others_median_r2"] == pytest.approx(0.91, abs=0.01)
    assert ev["gap"] == pytest.approx(0.56, abs=0.02) and ev["best_step"] == N
    assert {"r2/S_p", "r2/PF_p", "r2/kappa_p"} <= set(ev) and all(isinstance(v, (int, float)) for v in ev.values())
    assert "PF_p 0.35" in f["summary"] and "S_p 0.91" in f["summary"]


def test_balanced_tasks_or_one_task_have_no_imbalance():
    assert imbalance(diagnose(history({"S_p": 0.62, "PF_p": 0.48, "kappa_p": 0.6}))) is None  # 0.14 apart
    assert imbalance(diagnose(history({"S_p": 0.9}))) is None
    assert imbalance(diagnose(history({"S_p": 0.9, "PF_p": 0.2}, n=3))) is None  # too short to judge


def test_the_recommendation_doubles_that_task_s_weight_and_keeps_the_others():
    findings = diagnose(history({"S_p": 0.92, "PF_p": 0.35, "kappa_p": 0.9}))
    patterns = capability(SPEC, "recommendation_patterns")()
    for weights, expected in ((None, {"PF_p": 2.0}), ({"S_p": 0.5}, {"S_p": 0.5, "PF_p": 2.0}),
                              ({"PF_p": 1.5, "kappa_p": 1.0}, {"PF_p": 3.0, "kappa_p": 1.0})):
        cfg = config(weights)
        recs = [r for r in recommend(findings, cfg, SPEC.knobs, patterns) if r["knob"] == "task_weights"]
        assert len(recs) == 1
        r = recs[0]
        assert (r["action"], r["value"], r["expected_impact"], r["risk"], r["effort"]) == (
            "set", expected, "medium", "medium", "low")
        patch, changes = to_patch(recs, cfg, SPEC.knobs)
        assert patch == {"loss.task_weights": expected}
        # the patched config passes the trainer's own check (weights of known targets, >= 0)
        SPEC.check_config({**apply_patch(cfg, patch), "data": {**cfg["data"], "source": "embedded"}})
