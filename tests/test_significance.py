import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from tunewise.phases.significance import compare, summarise

BASE = [0.70, 0.71, 0.69, 0.72, 0.70]
OPT = [0.80, 0.81, 0.79, 0.82, 0.80]


def test_numbers_match_hand_computation_and_scipy():
    r = compare(BASE, OPT, n_boot=2000)
    assert r["baseline"]["n"] == 5 and r["baseline"]["values"] == BASE
    assert r["baseline"]["mean"] == pytest.approx(0.704)
    # ddof=1: squared deviations 0.000016+0.000036+0.000196+0.000256+0.000016 = 0.00052, / 4
    assert r["baseline"]["std"] == pytest.approx(math.sqrt(0.00052 / 4))
    assert r["optimized"]["mean"] == pytest.approx(0.804)
    assert r["diff"] == pytest.approx(0.1) and r["improvement"] == pytest.approx(0.1)
    assert r["improvement_rel"] == pytest.approx(0.1 / 0.704)
    assert r["improvement_measured"] == pytest.approx(0.1 / 0.704)
    two = stats.ttest_ind(OPT, BASE, equal_var=False)
    one = stats.ttest_ind(OPT, BASE, equal_var=False, alternative="greater")
    assert r["t_statistic"] == pytest.approx(two.statistic)
    assert r["p_two_sided"] == pytest.approx(two.pvalue)
    assert r["p_one_sided"] == pytest.approx(one.pvalue)
    assert r["p_one_sided"] == pytest.approx(r["p_two_sided"] / 2)
    # Hedges' g: equal stds here, so pooled SD = that std; J = 1 - 3 / (4 * 10 - 9)
    sd = math.sqrt(0.00052 / 4)
    assert r["hedges_g"] == pytest.approx(0.1 / sd * (1 - 3 / 31), rel=1e-6)
    json.dumps(r, allow_nan=False)  # strictly JSON-serialisable


def test_large_planted_improvement_is_improved_with_ci_excluding_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(0.70, 0.01, 5)
    opt = rng.normal(0.80, 0.01, 5)
    r = compare(base, opt, n_boot=2000)
    assert r["verdict"] == "improved"
    assert r["ci"]["low"] > 0 and r["ci_excludes_zero"]
    assert r["ci"]["low"] < r["improvement"] < r["ci"]["high"]
    assert r["ci"]["level"] == pytest.approx(0.95)
    assert "improved" in r["reason"] and f"{r['optimized']['mean']:.4g}" in r["reason"]


def test_bootstrap_ci_matches_scipy_and_is_deterministic_for_a_seed():
    a = compare(BASE, OPT, n_boot=500, seed=7)
    b = compare(BASE, OPT, n_boot=500, seed=7)
    c = compare(BASE, OPT, n_boot=500, seed=8)
    assert a["ci"] == b["ci"]
    assert (a["ci"]["low"], a["ci"]["high"]) != (c["ci"]["low"], c["ci"]["high"])
    ref = stats.bootstrap((np.array(OPT), np.array(BASE)),
                          lambda o, b, axis=-1: o.mean(axis=axis) - b.mean(axis=axis),
                          n_resamples=500, paired=False, vectorized=True, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(7))
    assert a["ci"]["low"] == pytest.approx(ref.confidence_interval.low)
    assert a["ci"]["high"] == pytest.approx(ref.confidence_interval.high)


def test_identical_samples_are_no_significant_change_with_p_one():
    r = compare(BASE, BASE, n_boot=500)
    assert r["verdict"] == "no_significant_change"
    assert r["p_two_sided"] == pytest.approx(1.0)
    assert r["improvement"] == 0.0 and r["hedges_g"] == 0.0


def test_constant_sides_give_no_nan():
    same = compare([0.8] * 4, [0.8] * 4)
    assert same["p_two_sided"] == 1.0 and same["p_one_sided"] == 1.0
    assert same["verdict"] == "no_significant_change"
    assert same["ci"]["low"] == same["ci"]["high"] == 0.0
    json.dumps(same, allow_nan=False)
    better = compare([0.8] * 4, [0.9] * 4)
    assert better["p_two_sided"] == 0.0 and better["p_one_sided"] == 0.0
    assert better["p_one_sided_worse"] == 1.0 and better["verdict"] == "improved"
    assert better["ci"]["low"] == pytest.approx(0.1) and better["hedges_g"] is None
    json.dumps(better, allow_nan=False)
    worse = compare([0.8] * 4, [0.7] * 4)
    assert worse["verdict"] == "worse" and worse["p_one_sided_worse"] == 0.0
    # one constant side is still a proper Welch test (scipy's spurious 'precision loss' warning is silenced)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed = compare([0.8] * 5, OPT)
    # Welch with a constant baseline reduces to a one-sample t-test of OPT against 0.8
    assert mixed["p_two_sided"] == pytest.approx(stats.ttest_1samp(OPT, 0.8).pvalue)


def test_direction_min_mirrors_max():
    up = compare(BASE, OPT, direction="max", n_boot=500, seed=3)
    # the same higher values are a significant worsening when lower is better
    assert compare(BASE, OPT, direction="min", n_boot=500)["verdict"] == "worse"
    loss_base, loss_opt = [1.0 - v for v in BASE], [1.0 - v for v in OPT]
    loss = compare(loss_base, loss_opt, direction="min", n_boot=500, seed=3)
    assert loss["verdict"] == up["verdict"] == "improved"
    assert loss["improvement"] == pytest.approx(up["improvement"])
    assert loss["diff"] == pytest.approx(-up["diff"])
    assert loss["p_one_sided"] == pytest.approx(up["p_one_sided"])
    assert loss["p_one_sided"] == pytest.approx(
        stats.ttest_ind(loss_opt, loss_base, equal_var=False, alternative="less").pvalue)
    assert loss["ci"]["low"] == pytest.approx(up["ci"]["low"]) and loss["ci"]["high"] == pytest.approx(up["ci"]["high"])
    assert loss["hedges_g"] == pytest.approx(up["hedges_g"])
    assert loss["seed004_rule"] is True


def test_min_improvement_blocks_a_tiny_but_significant_gain():
    base = [1.000, 1.001, 0.999, 1.000, 1.000]
    opt = [1.010, 1.011, 1.009, 1.010, 1.010]  # +1% relative, very significant
    r = compare(base, opt, n_boot=500)
    assert r["p_one_sided"] < 1e-6
    assert r["verdict"] == "insufficient" and "below the minimum" in r["reason"]
    assert compare(base, opt, n_boot=500, min_improvement=0.005)["verdict"] == "improved"
    # absolute mode measures the gain in metric units: 0.01 >= 0.005 but < 0.03
    assert compare(base, opt, n_boot=500, mode="absolute", min_improvement=0.005)["verdict"] == "improved"
    absolute = compare(base, opt, n_boot=500, mode="absolute", min_improvement=0.03)
    assert absolute["verdict"] == "insufficient" and absolute["improvement_measured"] == pytest.approx(0.01)


def test_relative_mode_with_zero_baseline_falls_back_to_absolute():
    r = compare([-0.01, 0.01, 0.0], [0.5, 0.51, 0.49], n_boot=200)
    assert r["improvement_rel"] is None and r["improvement_measured_as"] == "absolute"
    assert r["improvement_measured"] == pytest.approx(0.5) and r["verdict"] == "improved"


def test_seed004_rule_true_and_false():
    # max: 0.804 - 2 * 0.0114 = 0.781 > 0.704
    assert compare(BASE, OPT, n_boot=200)["seed004_rule"] is True
    # noisy optimized side: mean 0.75 but std 0.05 -> 0.75 - 0.1 < 0.704
    noisy = [0.70, 0.80, 0.75, 0.69, 0.81]
    assert compare(BASE, noisy, n_boot=200)["seed004_rule"] is False
    # min: the optimized loss plus two stds must stay under the baseline mean
    assert compare([0.5, 0.51, 0.49], [0.30, 0.31, 0.29], direction="min", n_boot=200)["seed004_rule"] is True
    assert compare([0.5, 0.51, 0.49], [0.30, 0.55, 0.20], direction="min", n_boot=200)["seed004_rule"] is False


@pytest.mark.parametrize("side,values", [("baseline", [0.7, float("nan"), 0.71]), ("optimized", [0.8, 0.81, float("inf")])])
def test_non_finite_values_raise_naming_side_and_position(side, values):
    args = {"baseline": BASE, "optimized": OPT, side: values}
    pos = 1 if side == "baseline" else 2
    with pytest.raises(ValueError, match=rf"{side} value at position {pos}"):
        compare(args["baseline"], args["optimized"])


@pytest.mark.parametrize("side", ["baseline", "optimized"])
def test_fewer_than_two_values_raise_naming_side(side):
    args = {"baseline": BASE, "optimized": OPT, side: [0.7]}
    with pytest.raises(ValueError, match=side):
        compare(args["baseline"], args["optimized"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="direction"):
        compare(BASE, OPT, direction="up")
    with pytest.raises(ValueError, match="mode"):
        compare(BASE, OPT, mode="percent")


def test_summarise():
    s = summarise([1.0, 2.0, 3.0, 6.0])
    assert s == {"n": 4, "mean": 3.0, "std": pytest.approx(math.sqrt(14 / 3)), "min": 1.0, "max": 6.0}
    assert summarise([0.5])["std"] is None
    with pytest.raises(ValueError):
        summarise([])
    with pytest.raises(ValueError, match="position 0"):
        summarise([float("nan"), 1.0])


def test_aa_false_improvement_rate_is_controlled():
    alpha, trials = 0.05, 200
    rng = np.random.default_rng(12345)
    improved = significant = 0
    for i in range(trials):
        base, opt = rng.normal(10.0, 1.0, 5), rng.normal(10.0, 1.0, 5)
        r = compare(base, opt, alpha=alpha, min_improvement=0.0, n_boot=200, seed=i)
        improved += r["verdict"] == "improved"
        significant += r["p_one_sided"] < alpha
    se = math.sqrt(alpha * (1 - alpha) / trials)
    assert improved / trials <= alpha + 3 * se
    # the one-sided p is calibrated: about alpha of A/A comparisons are "significant", not ~0 nor ~2 alpha
    assert alpha - 3 * se <= significant / trials <= alpha + 3 * se


def test_gate_uses_the_one_sided_p():
    # a gain whose one-sided p (0.040) is under alpha while the two-sided p (0.081) is not
    base = [1.0, 1.1, 0.9, 1.05, 0.95]
    opt = [v + 0.1 for v in base]
    r = compare(base, opt, n_boot=500)
    assert r["p_one_sided"] < 0.05 < r["p_two_sided"]
    assert r["verdict"] == "improved"
    # the same gap the other way is a significant worsening, judged one-sided as well
    assert compare(opt, base, n_boot=500)["verdict"] == "worse"
