"""Seed 004's loop without Snakemake (tunewise.phases.rounds, tunewise.reports.rounds): the sweep space a retry
searches, the train-val gap decision A weighs, the loop's conclusion, and the report's rebased round pages."""
from __future__ import annotations

import pandas as pd
import pytest

from tunewise.phases import rounds
from tunewise.phases.decision import next_strategy
from tunewise.reports.rounds import demote, rebase
from tunewise.runs import write_json


def test_recommended_space_spans_each_numeric_change():
    diag = {"changes": [
        {"key": "optim.lr", "old": 0.01, "new": 0.001},
        {"key": "train.epochs", "old": 12, "new": 24},
        {"key": "optim.name", "old": "adam", "new": "sgd"},      # not numeric: not searched
        {"key": "train.grad_clip", "old": None, "new": 1.0},     # nothing to span from
        {"key": "model.dropout", "old": 0.0, "new": 0.2},        # 0 cannot be log-scaled
        {"key": "optim.momentum", "old": 0.9, "new": 0.5},       # a fraction stays below 1
        {"key": "optim.weight_decay", "old": 0.0, "new": 1e-4},
    ]}
    space = rounds.recommended_space(diag)
    assert space["optim.lr"] == {"type": "float", "low": 0.0005, "high": 0.02, "log": True}
    assert space["train.epochs"] == {"type": "int", "low": 6, "high": 48}
    assert space["model.dropout"] == {"type": "float", "low": 0.0, "high": 0.4}
    assert space["optim.momentum"] == {"type": "float", "low": 0.25, "high": 0.95, "log": True}
    assert space["optim.weight_decay"] == {"type": "float", "low": 0.0, "high": 2e-4}
    assert set(space) == {"optim.lr", "train.epochs", "model.dropout", "optim.momentum", "optim.weight_decay"}
    assert rounds.recommended_space({"changes": []}) == {}


def test_the_ladder_of_strategies_c_climbs():
    assert next_strategy("targeted", {"targeted", "sweep", "iterative"}) == "sweep"
    assert next_strategy("sweep", {"targeted", "sweep", "iterative"}) == "iterative"
    assert next_strategy("none", {"targeted", "sweep", "iterative"}) is None


def _run(tmp_path, rows, best_step):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(rows).to_csv(run / "history.csv", index=False)
    write_json(run / "metrics.json", {"best_step": best_step, "primary": {"best": 0.0}})
    return run


@pytest.mark.parametrize("direction,train,val,gap", [
    ("max", 0.95, 0.80, 0.15 / 0.80),   # the training split ahead: the gap seed 004 means
    ("max", 0.70, 0.80, 0.0),           # validation ahead (dropout, augmentation): no gap
    ("min", 0.10, 0.20, 0.10 / 0.20),   # a loss: lower is ahead
])
def test_train_val_gap_at_the_best_step(tmp_path, direction, train, val, gap):
    run = _run(tmp_path, {"step": [1, 2, 3], "train/acc": [0.5, train, 0.99], "val/acc": [0.4, val, 0.1]}, best_step=2)
    assert rounds.train_val_gap(run, "val/acc", direction) == pytest.approx(gap)


def test_no_train_side_metric_means_no_gap(tmp_path):
    run = _run(tmp_path, {"step": [1, 2], "val/similarity": [0.1, 0.2]}, best_step=2)
    assert rounds.train_val_gap(run, "val/similarity", "max") is None


def _record(k, option, next_step, chosen, starts_from, verdict="improved", gain=0.1):
    runs = {side: [f"results/x{'' if k == 1 else f'/round{k}'}/seeds/{side}/seed{s}" for s in (0, 1)]
            for side in ("baseline", "optimized")}
    if k > 1:
        runs["baseline"] = [f"results/x/seeds/optimized/seed{s}" for s in (0, 1)]
    return {"round": k, "verdict": verdict, "gain": gain, "p_one_sided": 0.01, "seed_runs": runs,
            "started_from": starts_from, "decision": {"option": option, "next": next_step, "chosen_side": chosen,
                                                      "label": option, "rationale": "r", "criteria": []}}


def test_the_conclusion_keeps_the_last_verified_config():
    exp = {"seed": 0}
    b2 = _record(1, "B", "iterate", "optimized", {"round": 1, "side": "baseline"})
    # round 2 was not an improvement: C reverts to round 2's start, which is round 1's optimized config
    c2 = _record(2, "C", "revert", "baseline", {"round": 1, "side": "optimized"}, verdict="worse", gain=-0.1)
    final = rounds.conclusion(exp, [b2, c2])
    assert (final["option"], final["chosen_side"], final["config_round"], final["config_side"]) == ("C", "optimized", 1, "optimized")
    assert final["config_path"] == "results/x/seeds/optimized/seed0/config.yaml"
    assert final["verified_by"]["round"] == 1
    # a C in round 1 keeps the baseline: nothing is claimed
    only = rounds.conclusion(exp, [_record(1, "C", "revert", "baseline", {"round": 1, "side": "baseline"}, "worse")])
    assert (only["chosen_side"], only["verified_by"]) == ("baseline", None)
    assert only["seed_run"] == "results/x/seeds/baseline/seed0/metrics.json"


def test_round_pages_are_rebased_and_demoted():
    page = "# Round\n\n## Decision\n\n![curves](plots/c.png) [sig](significance.md) [web](https://x.org) [top](#decision)\n```\n# not a heading\n```\n"
    text = demote(rebase(page, "round2"))
    assert "](round2/plots/c.png)" in text and "](round2/significance.md)" in text
    assert "](https://x.org)" in text and "](#decision)" in text
    assert "\n### Decision" in text and "\n# not a heading" in text
    assert rebase(page, "") == page
