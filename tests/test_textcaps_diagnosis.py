"""The textcaps trainer's own diagnosis (trainers/textcaps/diagnosis.py, wired through the spec's capabilities):
each rule fires on a synthetic history with its pathology, names its numbers, and stays quiet on a healthy one;
its recommendations move the trainer's knobs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tunewise.phases.diagnose import trainer_findings
from tunewise.phases.recommend import recommend, to_patch
from tunewise.trainers import get_spec
from tunewise.trainers.textcaps import diagnosis

METRIC = {"name": "val/worst_group_acc", "direction": "max"}
OWN = {"group_gap", "groupdro_q_collapse", "groupdro_q_oscillation", "anchor_fit_stalled", "class_overlap",
       "confusion_pairs"}
STEPS = np.arange(1, 11)


def healthy(**columns) -> pd.DataFrame:
    """Ten epochs of a GroupDRO run that does what it should (warm-up 2 epochs): the group gap opens under the
    warm-up's ERM and closes after it, q drifts towards the minority, the anchors fit, the classes part."""
    minority = np.array([0.10, 0.05, 0.20, 0.30, 0.38, 0.44, 0.48, 0.51, 0.53, 0.54])
    majority = np.array([0.30, 0.95, 0.85, 0.80, 0.76, 0.74, 0.72, 0.71, 0.70, 0.70])
    q_min = np.array([0.5, 0.5, 0.53, 0.56, 0.59, 0.62, 0.64, 0.66, 0.68, 0.70])
    data = {
        "step": STEPS,
        "train/loss": np.linspace(2.3, 1.2, 10),
        "val/acc/majority": majority,
        "val/acc/minority": minority,
        "val/worst_group_acc": np.minimum(majority, minority),
        "val/avg_acc": (majority + minority) / 2,
        "train/worst_group_acc": np.minimum(majority, minority) + 0.05,
        "q/majority": 1 - q_min,
        "q/minority": q_min,
        "groupdro/q_entropy": -(q_min * np.log(q_min) + (1 - q_min) * np.log(1 - q_min)) / np.log(2),
        "groupdro/q_max": np.maximum(q_min, 1 - q_min),
        "train/anchor_fit": np.linspace(114, 70, 10),
        "val/class_sep": np.linspace(0.05, 0.20, 10),
        "val/confusion_top_share": np.full(10, 0.25),
    }
    data.update(columns)
    return pd.DataFrame(data)


METRICS = {"status": "done", "objective_from_step": 3,
           "val_confusion_pairs": [{"classes": ["Book", "Poster"], "errors": 40},
                                   {"classes": ["Bottle", "Food"], "errors": 31},
                                   {"classes": ["Car", "Tree"], "errors": 12}]}


def findings(history, metrics=METRICS, **thresholds):
    spec = get_spec("textcaps")
    return trainer_findings(spec, history, metrics, METRIC, {**spec.diagnosis_thresholds, **thresholds})


def own(history, metrics=METRICS, **thresholds) -> dict:
    return {f["id"]: f for f in findings(history, metrics, **thresholds) if f["id"] in OWN}


def changes(finding_list, config) -> dict:
    spec = get_spec("textcaps")
    recs = recommend(finding_list, config, spec.knobs, spec.recommendation_patterns())
    patch, _ = to_patch(recs, config, spec.knobs, top_n=10)
    return patch


def test_a_healthy_history_raises_none_of_the_trainers_findings():
    assert own(healthy()) == {}


def test_a_persistent_group_gap_is_found_with_its_numbers_and_switches_groupdro_on():
    # ERM on the spurious data: the majority right by the shortcut, the minority wrong, to the end
    majority = np.array([0.3, 0.95, 0.97, 0.98, 0.98, 0.99, 0.98, 0.99, 0.98, 0.99])
    minority = np.array([0.1, 0.05, 0.03, 0.04, 0.02, 0.03, 0.04, 0.03, 0.03, 0.04])
    history = healthy(**{"val/acc/majority": majority, "val/acc/minority": minority,
                         "val/worst_group_acc": minority})
    found = own(history, {"status": "done"})
    gap = found["group_gap"]
    assert gap["root_cause"] == "group_gap" and gap["severity"] == "high"
    assert gap["evidence"]["group_gap_end"] == pytest.approx(np.mean(majority[-3:] - minority[-3:]))
    assert gap["evidence"]["group_gap_shrink"] < 0.25 and gap["evidence"]["worst_group_acc_end"] < 0.05
    assert "minority" in gap["summary"] and "majority" in gap["summary"]
    # a group the validation split lacks (all nan) is left out, not a reason to judge nothing
    with_absent = history.assign(**{"val/acc/absent": float("nan")})
    assert own(with_absent, {"status": "done"})["group_gap"]["evidence"] == gap["evidence"]

    config = get_spec("textcaps").default_config()
    config["groupdro"]["enabled"] = False
    assert changes([gap], config)["groupdro.enabled"] is True
    config["groupdro"]["enabled"] = True  # on already: a larger step size, and a shorter warm-up
    patch = changes([gap], config)
    assert patch["groupdro.eta"] == pytest.approx(3 * config["groupdro"]["eta"])
    assert patch["groupdro.warmup_epochs"] == 1


def test_a_gap_that_closes_or_is_small_is_no_finding():
    # closing: healthy() shrinks it from 0.90 to 0.16; small: a steady 0.1 that never closes
    assert "group_gap" not in own(healthy())
    flat = healthy(**{"val/acc/majority": np.full(10, 0.6), "val/acc/minority": np.full(10, 0.5)})
    assert "group_gap" not in own(flat)
    # the threshold is the user's to move (diagnose.thresholds.group_gap_min)
    assert "group_gap" in own(flat, group_gap_min=0.05)


def test_a_collapsed_q_is_found_and_lowers_the_step_size():
    q_min = np.array([0.5, 0.5, 0.99, 0.995, 0.998, 0.999, 0.999, 0.999, 0.999, 0.999])
    history = healthy(**{"q/minority": q_min, "q/majority": 1 - q_min, "groupdro/q_max": q_min,
                         "groupdro/q_entropy": -(q_min * np.log(q_min) + (1 - q_min) * np.log(1 - q_min)) / np.log(2)})
    found = own(history)
    collapse = found["groupdro_q_collapse"]
    assert collapse["root_cause"] == "groupdro_unstable"
    assert collapse["evidence"]["q_entropy_end"] < 0.02 and collapse["evidence"]["q_max_end"] > 0.99
    assert "groupdro_q_oscillation" not in found  # it jumped once, at the end of warm-up, then stayed
    config = get_spec("textcaps").default_config()
    assert changes([collapse], config)["groupdro.eta"] == pytest.approx(0.1 * config["groupdro"]["eta"])


def test_an_oscillating_q_is_found():
    q_min = np.array([0.5, 0.5, 0.9, 0.2, 0.85, 0.15, 0.9, 0.2, 0.8, 0.25])
    history = healthy(**{"q/minority": q_min, "q/majority": 1 - q_min, "groupdro/q_max": np.maximum(q_min, 1 - q_min),
                         "groupdro/q_entropy": np.full(10, 0.7)})
    found = own(history)
    assert found["groupdro_q_oscillation"]["evidence"]["q_change_std"] > 0.5
    assert "groupdro_q_collapse" not in found


def test_an_anchor_fit_that_does_not_fall_is_found_and_raises_lambda_fit():
    rising = healthy(**{"train/anchor_fit": np.array([126, 168, 182, 160, 165, 170, 166, 172, 170, 171.0])})
    stalled = own(rising)["anchor_fit_stalled"]
    assert stalled["root_cause"] == "anchor_fit"
    assert stalled["evidence"]["anchor_fit_first"] == 126 and stalled["evidence"]["anchor_fit_drop"] < 0
    flat = healthy(**{"train/anchor_fit": np.linspace(123, 118, 10)})
    assert own(flat)["anchor_fit_stalled"]["evidence"]["anchor_fit_drop"] == pytest.approx(1 - 118.5 / 123, abs=0.01)
    config = get_spec("textcaps").default_config()
    assert changes([stalled], config)["anchors.lambda_fit"] == pytest.approx(10 * config["anchors"]["lambda_fit"])
    config["anchors"]["lambda_fit"] = 0.0  # scaling 0 changes nothing: a weight is set
    assert changes([stalled], config)["anchors.lambda_fit"] == pytest.approx(1e-2)


def test_overlapping_classes_are_found_and_raise_lambda_sep():
    history = healthy(**{"val/class_sep": np.array([0.02, 0.03, 0.035, 0.04, 0.04, 0.038, 0.036, 0.035, 0.034, 0.033])})
    overlap = own(history)["class_overlap"]
    assert overlap["evidence"]["class_sep_end"] == pytest.approx(0.034) and overlap["evidence"]["class_sep_slope"] < 0
    config = get_spec("textcaps").default_config()
    assert changes([overlap], config)["anchors.lambda_sep"] == pytest.approx(10 * config["anchors"]["lambda_sep"])
    # low but still parting: training is getting there, no finding
    assert "class_overlap" not in own(healthy(**{"val/class_sep": np.linspace(0.01, 0.04, 10)}))


def test_confusion_on_a_few_pairs_is_named_without_a_config_change():
    history = healthy(**{"val/confusion_top_share": np.linspace(0.5, 0.7, 10)})
    pairs = own(history)["confusion_pairs"]
    assert pairs["root_cause"] == "data" and pairs["evidence"]["pair1_errors"] == 40
    assert "Book / Poster (40 errors)" in pairs["summary"]
    assert changes([pairs], get_spec("textcaps").default_config()) == {}


def test_a_diverged_run_gets_only_the_generic_finding():
    history = healthy(**{"train/loss": [2.3, 1.9, float("nan"), *[float("nan")] * 7]})
    ids = {f["id"] for f in findings(history, {"status": "diverged"})}
    assert "divergence" in ids and not ids & OWN


def test_the_trainers_thresholds_are_accepted_by_the_config_and_a_typo_is_not():
    from tunewise.config import ConfigError, validate_schema
    from tunewise.experiment import resolve_experiment

    def resolve(thresholds):
        return resolve_experiment(validate_schema({"experiments": {"tc": {
            "trainer": "textcaps", "diagnose": {"thresholds": thresholds}}}}), "tc")

    assert resolve({"group_gap_min": 0.3, "min_rows": 5})["diagnose"]["thresholds"]["group_gap_min"] == 0.3
    with pytest.raises(ConfigError, match="did you mean 'group_gap_min'"):
        resolve({"group_gap_mn": 0.3})


def test_the_spec_carries_the_rules_without_numpy_or_torch():
    import subprocess
    import sys

    code = ("import sys; from tunewise.trainers import get_spec; s = get_spec('textcaps'); "
            "assert s.diagnosis_thresholds and s.recommendation_patterns(); "
            "print(sorted(m for m in ('numpy', 'torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- what the trainer logs for these rules -----------------------------------------------------------------


def test_confusion_pairs_and_class_separation():
    torch = pytest.importorskip("torch")
    from tunewise.trainers.textcaps.trainer import class_separation, confusion_pairs

    matrix = [[50, 8, 1], [12, 40, 0], [1, 2, 60]]
    share, pairs = confusion_pairs(matrix, ["a", "b", "c"], top=1)
    assert share == pytest.approx(20 / 24) and pairs == [{"classes": ["a", "b"], "errors": 20}]
    assert np.isnan(confusion_pairs([[3, 0], [0, 3]], ["a", "b"])[0])

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    apart = torch.randn(300, 16, generator=g) + 4 * torch.nn.functional.one_hot(labels, 16).float()
    mixed = torch.randn(300, 16, generator=g)
    assert class_separation(apart, labels, 3) > 0.5 > 0.05 > class_separation(mixed, labels, 3)


def test_groupdro_reports_how_concentrated_q_is():
    torch = pytest.importorskip("torch")
    from tunewise.trainers.textcaps.groupdro import GroupDRO

    dro = GroupDRO(2)
    assert dro.concentration() == {"groupdro/q_entropy": pytest.approx(1.0), "groupdro/q_max": pytest.approx(0.5)}
    dro.q = torch.tensor([0.999, 0.001], dtype=torch.float64)
    c = dro.concentration()
    assert c["groupdro/q_entropy"] < 0.02 and c["groupdro/q_max"] == pytest.approx(0.999)
