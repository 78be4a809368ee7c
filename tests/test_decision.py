import pytest

from tunewise.phases.decision import decide, improvement_box_ok, meets_target, next_strategy
from tunewise.phases.significance import compare

BASE = [0.70, 0.71, 0.69, 0.72, 0.70]  # mean 0.704
BETTER = [0.80, 0.81, 0.79, 0.82, 0.80]  # mean 0.804, verified improvement
SAME = [0.705, 0.69, 0.715, 0.70, 0.71]  # mean 0.704, no change
WORSE = [0.60, 0.61, 0.59, 0.62, 0.60]  # mean 0.604


def _sig(opt, base=BASE, direction="max"):
    return compare(base, opt, direction=direction, n_boot=300)


def test_option_a_improved_and_target_met():
    sig = _sig(BETTER)
    d = decide(sig, 0.704, "max", target=0.80, strategy="targeted")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("A", "finalize", "optimized", True)
    assert "0.804" in d["rationale"] and "0.704" in d["rationale"] and ">= 0.8" in d["rationale"]
    assert improvement_box_ok(sig, d)
    # without a target a verified improvement is enough
    d = decide(sig, 0.704, "max", target=None, strategy="targeted")
    assert (d["option"], d["chosen_side"], d["target_met"]) == ("A", "optimized", None)


def test_option_a_with_baseline_when_no_improvement_but_baseline_meets_target():
    sig = _sig(SAME)
    d = decide(sig, 0.704, "max", target=0.70, strategy="targeted")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("A", "finalize", "baseline", True)
    assert "no_significant_change" in d["rationale"]
    assert improvement_box_ok(sig, d)


UNDERFIT = [{"id": "underfitting", "root_cause": "underfitting", "severity": "high"}]
STILL = [{"id": "still_improving", "root_cause": "lr_too_low", "severity": "medium"}]


def test_option_b_iterates_while_iterations_are_left_then_finalizes():
    sig = _sig(BETTER)
    d = decide(sig, 0.704, "max", target=0.90, strategy="iterative", iterations_left=2, open_findings=STILL)
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("B", "iterate", "optimized", False)
    assert "2 round(s) left" in d["rationale"] and ">= 0.9" in d["rationale"] and "target met" in d["rationale"]
    d = decide(sig, 0.704, "max", target=0.90, strategy="iterative", iterations_left=0, open_findings=STILL)
    assert (d["option"], d["next"], d["chosen_side"]) == ("B", "finalize", "optimized")
    assert "no rounds are left" in d["rationale"]
    assert improvement_box_ok(sig, d)
    # the other ends of the loop: the time budget, nothing actionable left, a gain at the ceiling
    d = decide(sig, 0.704, "max", 0.90, "targeted", iterations_left=2, open_findings=STILL, out_of_time=True)
    assert d["next"] == "finalize" and "time budget" in d["rationale"]
    d = decide(sig, 0.704, "max", 0.90, "targeted", iterations_left=2, open_findings=[])
    assert d["next"] == "finalize" and "nothing actionable" in d["rationale"]
    d = decide(sig, 0.704, "max", 0.90, "targeted", attempts=[0.015], iterations_left=2, open_findings=STILL)
    assert d["next"] == "finalize" and "under the ceiling gain 2%" in d["rationale"]


def test_a_is_not_declared_while_a_high_severity_finding_is_open_and_rounds_are_left():
    """The default run's latent_mp case: a verified improvement and no target, but the optimized run itself
    still underfits; with rounds left that is B (go on), not A."""
    sig = _sig(BETTER)
    d = decide(sig, 0.704, "max", None, "targeted", iterations_left=1, open_findings=UNDERFIT)
    assert (d["option"], d["next"]) == ("B", "iterate") and "underfitting (high severity)" in d["rationale"]
    # no rounds left: the finding cannot be acted on, and every criterion holds
    d = decide(sig, 0.704, "max", None, "targeted", iterations_left=0, open_findings=UNDERFIT)
    assert (d["option"], d["next"]) == ("A", "finalize")
    # a medium finding does not hold A back
    assert decide(sig, 0.704, "max", None, "targeted", iterations_left=1, open_findings=STILL)["option"] == "A"


def test_a_criteria_are_thresholds_with_their_values():
    sig = _sig(BETTER)
    ok = {"optimized": {"train_val_gap": 0.04, "seed_std": 0.005}}
    d = decide(sig, 0.704, "max", None, "targeted", evidence=ok)
    assert d["option"] == "A"
    rows = {c["name"]: c for c in d["criteria"]}
    assert rows["relative train-val gap"]["value"] == 0.04 and rows["relative train-val gap"]["threshold"] == 0.1
    assert rows["relative train-val gap"]["ok"] and rows["improvement verified"]["ok"] and rows["target met"]["ok"] is None
    wide = {"optimized": {"train_val_gap": 0.25, "seed_std": 0.005}}
    d = decide(sig, 0.704, "max", None, "targeted", evidence=wide, open_findings=STILL, iterations_left=1)
    assert (d["option"], d["next"]) == ("B", "iterate") and "short of A (relative train-val gap)" in d["rationale"]
    # the thresholds are the config's
    d = decide(sig, 0.704, "max", None, "targeted", evidence=wide, accept={"max_train_val_gap": 0.3})
    assert d["option"] == "A"
    spread = {"optimized": {"train_val_gap": None, "seed_std": 0.02}}
    d = decide(sig, 0.704, "max", None, "targeted", evidence=spread)
    assert d["option"] == "B" and "seed spread" in d["rationale"]
    assert {c["name"]: c["ok"] for c in d["criteria"]}["relative train-val gap"] is None  # not measured: does not block


def test_option_c_retries_with_the_next_strategy_while_rounds_are_left():
    sig = _sig(SAME)
    d = decide(sig, 0.704, "max", 0.80, "targeted", attempts=[0.0], iterations_left=1, next_strategy="sweep")
    assert (d["option"], d["next"], d["next_strategy"], d["chosen_side"]) == ("C", "retry", "sweep", "baseline")
    assert "re-diagnose and try the next strategy, sweep" in d["rationale"]
    d = decide(sig, 0.704, "max", 0.80, "sweep", attempts=[0.0], iterations_left=1, next_strategy=None)
    assert (d["option"], d["next"]) == ("C", "revert") and "no strategy is left after sweep" in d["rationale"]
    assert next_strategy("targeted", {"targeted", "sweep", "iterative"}) == "sweep"
    assert next_strategy("targeted", {"targeted", "iterative"}) == "iterative"
    assert next_strategy("iterative", {"targeted", "sweep", "iterative"}) is None


@pytest.mark.parametrize("opt,verdict", [(SAME, "no_significant_change"), (WORSE, "worse")])
def test_option_c_reverts_to_baseline(opt, verdict):
    sig = _sig(opt)
    assert sig["verdict"] == verdict
    d = decide(sig, 0.704, "max", target=0.80, strategy="targeted", iterations_left=0, next_strategy="sweep")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("C", "revert", "baseline", False)
    assert verdict in d["rationale"] and "revert" in d["rationale"] and "no rounds are left" in d["rationale"]
    assert improvement_box_ok(sig, d)


def test_option_c_for_insufficient_gain_even_if_optimized_mean_reaches_target():
    base = [1.000, 1.001, 0.999, 1.000, 1.000]
    sig = compare(base, [1.010, 1.011, 1.009, 1.010, 1.010], n_boot=300)
    assert sig["verdict"] == "insufficient"
    d = decide(sig, 1.0, "max", target=1.005, strategy="targeted")
    assert (d["option"], d["chosen_side"], d["target_met"]) == ("C", "baseline", False)
    assert "below the minimum improvement" in d["rationale"]


def test_option_d_ceiling_after_several_small_attempts():
    sig = _sig(SAME)
    d = decide(sig, 0.704, "max", target=0.80, strategy="iterative", attempts=[0.01, 0.015], iterations_left=1)
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("D", "accept_ceiling", "baseline", False)
    assert "+1.00%" in d["rationale"] and "+1.50%" in d["rationale"] and "2%" in d["rationale"]
    # one attempt is not "multiple attempts", and one attempt over the ceiling breaks the rule
    assert decide(sig, 0.704, "max", 0.80, "iterative", attempts=[0.01])["option"] == "C"
    assert decide(sig, 0.704, "max", 0.80, "iterative", attempts=[0.01, 0.025])["option"] == "C"
    # a verified improvement at the ceiling keeps the optimized side
    small = _sig(BETTER)
    d = decide(small, 0.704, "max", 0.90, "iterative", attempts=[0.01, 0.012], iterations_left=3)
    assert (d["option"], d["chosen_side"]) == ("D", "optimized") and improvement_box_ok(small, d)


def test_option_d_keeps_baseline_when_optimized_is_better_only_by_mean():
    opt = [0.705, 0.72, 0.69, 0.73, 0.70]  # mean 0.709: higher, but not significant
    sig = _sig(opt)
    assert sig["verdict"] == "no_significant_change" and sig["optimized"]["mean"] > 0.704
    d = decide(sig, 0.704, "max", 0.80, "iterative", attempts=[0.005, 0.007])
    assert (d["option"], d["chosen_side"]) == ("D", "baseline")
    assert "not verifiably" in d["rationale"] and improvement_box_ok(sig, d)


def test_skipped_optimization():
    d = decide(None, 0.85, "max", target=0.80, strategy="none")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("A", "finalize", "baseline", True)
    d = decide(None, 0.85, "max", target=None, strategy="none",
               skip_reason="insufficient_history: too short to judge")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("D", "accept_ceiling", "baseline", None)
    assert d["label"] == "Baseline accepted: optimization skipped" and "0.85" in d["rationale"]
    # the decision says why the diagnosis skipped, never a ceiling it did not claim
    assert "too short to judge" in d["rationale"] and "ceiling" not in d["rationale"]
    d = decide({"skipped": True, "baseline": {"n": 3, "mean": 0.85}}, 0.85, "max", target=0.9, strategy="none")
    assert (d["option"], d["chosen_side"], d["target_met"]) == ("D", "baseline", False)
    assert "misses the target" in d["rationale"]
    assert improvement_box_ok(None, d)


def test_direction_min_uses_lower_is_better_for_the_target():
    loss_base = [0.30, 0.31, 0.29, 0.32, 0.30]  # mean 0.304
    loss_opt = [0.20, 0.21, 0.19, 0.22, 0.20]  # mean 0.204
    sig = compare(loss_base, loss_opt, direction="min", n_boot=300)
    assert decide(sig, 0.304, "min", target=0.25, strategy="targeted")["option"] == "A"
    d = decide(sig, 0.304, "min", target=0.10, strategy="targeted", iterations_left=1, open_findings=STILL)
    assert (d["option"], d["next"]) == ("B", "iterate") and "<= 0.1" in d["rationale"]
    assert meets_target(0.2, 0.25, "min") is True and meets_target(0.3, 0.25, "min") is False
    assert meets_target(0.3, None, "min") is None


def test_improvement_box_rejects_unverified_claims():
    sig = _sig(SAME)
    claim = {"option": "A", "chosen_side": "optimized", "target_met": None}
    assert not improvement_box_ok(sig, claim)
    assert improvement_box_ok(sig, {**claim, "target_met": True})
    assert not improvement_box_ok(None, claim)
    assert improvement_box_ok(sig, {**claim, "chosen_side": "baseline"})


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="direction"):
        decide(None, 0.7, "up", None, "none")
    with pytest.raises(ValueError, match="attempts"):
        decide(_sig(SAME), 0.704, "max", 0.8, "iterative", attempts=[0.01, float("nan")])
