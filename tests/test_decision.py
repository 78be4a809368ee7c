import pytest

from tunewise.phases.decision import decide, improvement_box_ok, meets_target
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


def test_option_b_iterates_while_iterations_are_left_then_finalizes():
    sig = _sig(BETTER)
    d = decide(sig, 0.704, "max", target=0.90, strategy="iterative", iterations_left=2)
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("B", "iterate", "optimized", False)
    assert "2 iteration" in d["rationale"] and ">= 0.9" in d["rationale"]
    d = decide(sig, 0.704, "max", target=0.90, strategy="iterative", iterations_left=0)
    assert (d["option"], d["next"], d["chosen_side"]) == ("B", "finalize", "optimized")
    assert "no iterations are left" in d["rationale"] and "missed" in d["rationale"]
    assert improvement_box_ok(sig, d)


@pytest.mark.parametrize("opt,verdict", [(SAME, "no_significant_change"), (WORSE, "worse")])
def test_option_c_reverts_to_baseline(opt, verdict):
    sig = _sig(opt)
    assert sig["verdict"] == verdict
    d = decide(sig, 0.704, "max", target=0.80, strategy="targeted", iterations_left=2)
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("C", "revert", "baseline", False)
    assert verdict in d["rationale"] and "revert" in d["rationale"]
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
    d = decide(None, 0.85, "max", target=None, strategy="none")
    assert (d["option"], d["next"], d["chosen_side"], d["target_met"]) == ("D", "accept_ceiling", "baseline", None)
    assert d["label"] == "Baseline accepted: optimization skipped" and "0.85" in d["rationale"]
    d = decide({"skipped": True, "baseline": {"n": 3, "mean": 0.85}}, 0.85, "max", target=0.9, strategy="none")
    assert (d["option"], d["chosen_side"], d["target_met"]) == ("D", "baseline", False)
    assert "misses the target" in d["rationale"]
    assert improvement_box_ok(None, d)


def test_direction_min_uses_lower_is_better_for_the_target():
    loss_base = [0.30, 0.31, 0.29, 0.32, 0.30]  # mean 0.304
    loss_opt = [0.20, 0.21, 0.19, 0.22, 0.20]  # mean 0.204
    sig = compare(loss_base, loss_opt, direction="min", n_boot=300)
    assert decide(sig, 0.304, "min", target=0.25, strategy="targeted")["option"] == "A"
    d = decide(sig, 0.304, "min", target=0.10, strategy="targeted", iterations_left=1)
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
