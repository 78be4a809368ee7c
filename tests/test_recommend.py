"""Recommendations from findings, ranking, and the config patch they turn into."""
from __future__ import annotations

import copy

import pytest

from tunewise.phases.diagnose import diagnose
from tunewise.config import get_dotted, set_dotted
from tunewise.phases.recommend import apply_patch, recommend, to_patch

KNOBS = {
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "dropout": "model.dropout",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "capacity": ["model.hidden", "model.latent_dim"],
    "scheduler": "schedule.name",
    "warmup": "schedule.warmup_epochs",
    "grad_clip": "train.grad_clip",
    "patience": "train.patience",
    "augmentation": "data.noise",
}


def config() -> dict:
    return {
        "data": {"noise": 0.0},
        "model": {"hidden": 256, "latent_dim": 64, "dropout": 0.1},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "none", "warmup_epochs": 0},
        "train": {"epochs": 30, "batch_size": 256, "grad_clip": None, "patience": None},
    }


def finding(fid: str, root_cause: str, severity: str = "high", **evidence) -> dict:
    return {"id": fid, "root_cause": root_cause, "severity": severity, "summary": "", "evidence": evidence}


OVERFIT = finding("overfitting", "overfitting", gap=0.23, best_step=12, degradation=0.08)
UNDERFIT = finding("underfitting", "underfitting", train_end=0.55, gap=0.02)
DIVERGED = finding("divergence", "lr_too_high", first_nonfinite_step=7, last_finite_loss=3.2, grad_norm_p90=4.27)


def by_knob(recs: list[dict]) -> dict[str, dict]:
    return {r["knob"]: r for r in recs}


# --- patterns -----------------------------------------------------------------------------------------------


def test_overfitting_recommendations_and_their_order():
    recs = recommend([OVERFIT], config(), KNOBS)
    assert [r["knob"] for r in recs] == ["dropout", "weight_decay", "augmentation", "capacity", "patience"]
    r = by_knob(recs)
    assert (r["dropout"]["action"], r["dropout"]["value"]) == ("set", 0.3)
    assert (r["weight_decay"]["action"], r["weight_decay"]["value"]) == ("set", 1e-4)
    assert (r["augmentation"]["action"], r["augmentation"]["value"]) == ("set", 0.05)
    assert (r["capacity"]["action"], r["capacity"]["value"]) == ("scale", 0.5)
    assert (r["patience"]["action"], r["patience"]["value"]) == ("set", 5)
    for rec in recs:
        assert rec["root_cause"] == "overfitting" and rec["finding_id"] == "overfitting"
        assert "gap=0.23" in rec["rationale"] and "best_step=12" in rec["rationale"]
        assert {rec["expected_impact"], rec["risk"], rec["effort"]} <= {"high", "medium", "low"}


def test_overfitting_strengthens_existing_regularisation():
    cfg = config()
    cfg["optim"]["weight_decay"] = 1e-3
    cfg["data"]["noise"] = 0.1
    cfg["train"]["patience"] = 3  # already shorter than 5: left alone
    r = by_knob(recommend([OVERFIT], cfg, KNOBS))
    assert (r["weight_decay"]["action"], r["weight_decay"]["value"]) == ("scale", 10.0)
    assert (r["augmentation"]["action"], r["augmentation"]["value"]) == ("scale", 2.0)
    assert "patience" not in r


def test_boolean_augmentation_is_switched_on():
    cfg = config()
    cfg["data"]["noise"] = False
    r = by_knob(recommend([OVERFIT], cfg, KNOBS))
    assert (r["augmentation"]["action"], r["augmentation"]["value"]) == ("set", True)
    cfg["data"]["noise"] = True
    assert "augmentation" not in by_knob(recommend([OVERFIT], cfg, KNOBS))


def test_underfitting_recommendations():
    recs = recommend([UNDERFIT], config(), KNOBS)
    assert [r["knob"] for r in recs] == ["lr", "capacity", "dropout", "epochs"]
    r = by_knob(recs)
    assert (r["lr"]["action"], r["lr"]["value"]) == ("scale", 3.0)
    assert (r["capacity"]["action"], r["capacity"]["value"]) == ("scale", 2.0)
    assert (r["dropout"]["action"], r["dropout"]["value"]) == ("scale", 0.5)
    assert (r["epochs"]["action"], r["epochs"]["value"]) == ("scale", 2.0)
    # no weight decay to remove
    assert "weight_decay" not in r


def test_lr_too_high_uses_the_p90_gradient_norm_for_clipping():
    r = by_knob(recommend([DIVERGED], config(), KNOBS))
    assert (r["lr"]["action"], r["lr"]["value"]) == ("scale", 0.1)
    assert (r["warmup"]["action"], r["warmup"]["value"]) == ("set", 2)
    assert (r["grad_clip"]["action"], r["grad_clip"]["value"]) == ("set", 4.27)
    assert "grad_norm_p90=4.27" in r["grad_clip"]["rationale"]
    no_p90 = finding("rising_train_loss", "lr_too_high", final_loss=1.2)
    assert by_knob(recommend([no_p90], config(), KNOBS))["grad_clip"]["value"] == 1.0


def test_large_updates_scale_the_lr_towards_a_healthy_step():
    big = finding("large_updates", "lr_too_high", "medium", update_ratio_median=0.02, grad_norm_p90=3.0)
    assert by_knob(recommend([big], config(), KNOBS))["lr"]["value"] == 0.12  # 2.5e-3 / 0.02 = 0.125
    huge = finding("large_updates", "lr_too_high", "medium", update_ratio_median=0.5)
    assert by_knob(recommend([huge], config(), KNOBS))["lr"]["value"] == 0.1  # never below a tenth at once
    barely = finding("large_updates", "lr_too_high", "medium", update_ratio_median=0.011)
    assert by_knob(recommend([barely], config(), KNOBS))["lr"]["value"] == 0.23


def test_mostly_clipped_gradients_lower_the_lr_gently_and_keep_the_bound():
    cfg = config()
    cfg["train"]["grad_clip"] = 1.0
    clipped = finding("grad_clipping", "lr_too_high", "medium", grad_clip_frac=0.7, grad_norm_p90=3.0)
    r = by_knob(recommend([clipped], cfg, KNOBS))
    assert r["lr"]["value"] == 0.3
    assert "grad_clip" not in r


def test_still_improving_trains_longer_first():
    still = finding("still_improving", "lr_too_low", "medium", best_step=30, recent_gain=0.05)
    recs = recommend([still], config(), KNOBS)
    assert [(r["knob"], r["action"], r["value"]) for r in recs] == [("epochs", "scale", 2.0), ("lr", "scale", 3.0)]


def test_early_plateau_shortens_training():
    early = finding("best_step_early", "early_plateau", "low", best_step=2, epochs_run=30)
    r = by_knob(recommend([early], config(), KNOBS))
    assert (r["epochs"]["action"], r["epochs"]["value"]) == ("set", 5)
    assert (r["patience"]["action"], r["patience"]["value"]) == ("set", 5)
    later = finding("best_step_early", "early_plateau", "low", best_step=8, epochs_run=100)
    cfg = config()
    cfg["train"]["epochs"] = 100
    assert by_knob(recommend([later], cfg, KNOBS))["epochs"]["value"] == 16
    # never lengthens training
    cfg["train"]["epochs"] = 12
    assert "epochs" not in by_knob(recommend([later], cfg, KNOBS))


def test_noisy_and_resources():
    noisy = finding("noisy_validation", "noisy", "medium", jitter_to_range=0.3)
    r = by_knob(recommend([noisy], config(), KNOBS))
    assert (r["lr"]["value"], r["batch_size"]["value"]) == (0.5, 2.0)
    bound = finding("input_bound", "resources", "low", data_frac=0.45)
    assert [(x["knob"], x["value"]) for x in recommend([bound], config(), KNOBS)] == [("batch_size", 2.0)]


def test_unknown_root_cause_has_no_recommendation():
    assert recommend([finding("mystery", "unknown", "low", rows=2)], config(), KNOBS) == []


def test_a_run_too_short_to_judge_is_run_longer():
    short = finding("insufficient_history", "too_short", "medium", rows=2, min_rows=4)
    recs = recommend([short], config(), KNOBS)
    assert [(r["knob"], r["action"], r["value"]) for r in recs] == [("epochs", "scale", 4.0)]
    assert "too short to judge" in recs[0]["rationale"]
    assert (recs[0]["expected_impact"], recs[0]["risk"], recs[0]["effort"]) == ("medium", "low", "medium")
    patch, _ = to_patch(recs, config(), KNOBS)
    assert patch == {"train.epochs": 120}
    # three rows of four: at least twice the rows the diagnosis needs, never less than twice the run
    assert recommend([finding("insufficient_history", "too_short", rows=3, min_rows=4)], config(), KNOBS)[0]["value"] == 3.0
    assert recommend([finding("insufficient_history", "too_short", rows=0, min_rows=4)], config(), KNOBS)[0]["value"] == 4.0


def test_underfitting_raises_the_lr_by_one_step():
    recs = by_knob(recommend([UNDERFIT], config(), KNOBS))
    assert (recs["lr"]["action"], recs["lr"]["value"]) == ("scale", 3.0)
    assert recs["lr"]["expected_impact"] == "high" and "one step (x3)" in recs["lr"]["rationale"]
    patch, _ = to_patch(recommend([UNDERFIT], config(), KNOBS), config(), KNOBS)
    assert patch["optim.lr"] == pytest.approx(3e-3)


def test_a_plateau_adds_a_scheduler_only_without_one():
    plateau = finding("validation_plateau", "early_plateau", "low", best_step=12, epochs_run=30)
    r = by_knob(recommend([plateau], config(), KNOBS))
    assert (r["scheduler"]["action"], r["scheduler"]["value"]) == ("set", "plateau")
    assert (r["scheduler"]["expected_impact"], r["scheduler"]["risk"], r["scheduler"]["effort"]) == ("medium", "low", "low")
    assert "ReduceLROnPlateau" in r["scheduler"]["rationale"]
    early = finding("best_step_early", "early_plateau", "low", best_step=2, epochs_run=30)
    assert by_knob(recommend([early], config(), KNOBS))["scheduler"]["value"] == "cosine"
    for existing in ("cosine", "plateau", "linear", "step"):
        cfg = config()
        cfg["schedule"]["name"] = existing
        assert "scheduler" not in by_knob(recommend([plateau, early], cfg, KNOBS))
    # a trainer without the knob (pez) gets no scheduler
    assert "scheduler" not in by_knob(recommend([plateau], config(), {k: v for k, v in KNOBS.items() if k != "scheduler"}))


# --- skipping, dedup, ranking -------------------------------------------------------------------------------


def test_absent_knobs_are_skipped():
    knobs = {k: v for k, v in KNOBS.items() if k not in ("dropout", "augmentation")}
    knobs_recs = [r["knob"] for r in recommend([OVERFIT], config(), knobs)]
    assert "dropout" not in knobs_recs and "augmentation" not in knobs_recs
    assert knobs_recs[0] == "weight_decay"


def test_recommendations_that_change_nothing_are_skipped():
    cfg = config()
    cfg["model"]["dropout"] = 0.5  # max(0.5, 0.3) == 0.5
    assert "dropout" not in by_knob(recommend([OVERFIT], cfg, KNOBS))
    cfg["model"]["dropout"] = 0.0  # halving nothing changes nothing
    assert "dropout" not in by_knob(recommend([UNDERFIT], cfg, KNOBS))


def test_one_recommendation_per_knob_with_combined_rationale():
    still = finding("still_improving", "lr_too_low", "medium", best_step=30, recent_gain=0.05)
    recs = recommend([UNDERFIT, still], config(), KNOBS)
    knobs = [r["knob"] for r in recs]
    assert len(knobs) == len(set(knobs))
    lr = by_knob(recs)["lr"]
    assert lr["finding_id"] == "underfitting"  # high impact beats lr_too_low's medium
    assert "still_improving" in lr["rationale"] and "recent_gain=0.05" in lr["rationale"]
    epochs = by_knob(recs)["epochs"]
    assert epochs["finding_id"] == "still_improving"  # lr_too_low rates it high impact, underfitting medium


def test_ranking_impact_then_effort_then_risk_then_severity():
    recs = recommend([finding("input_bound", "resources", "low", data_frac=0.5), OVERFIT,
                      finding("noisy_validation", "noisy", "medium", jitter_to_range=0.3)], config(), KNOBS)
    impact = {"high": 0, "medium": 1, "low": 2}
    cost = {"low": 0, "medium": 1, "high": 2}
    keys = [(impact[r["expected_impact"]], cost[r["effort"]], cost[r["risk"]]) for r in recs]
    assert keys == sorted(keys)
    assert recs[0]["knob"] == "dropout"
    # equal impact, effort and risk: the high-severity overfitting finding ranks above the medium noisy one
    ties = [r["finding_id"] for r in recs if (r["expected_impact"], r["effort"], r["risk"]) == ("medium", "low", "low")]
    assert ties == ["overfitting", "overfitting", "noisy_validation"]
    # batch_size: noisy (medium impact) beats resources (low impact)
    assert by_knob(recs)["batch_size"]["finding_id"] == "noisy_validation"


# --- patch --------------------------------------------------------------------------------------------------


def test_to_patch_applies_the_top_n_with_list_knobs_and_ints():
    cfg = config()
    recs = recommend([OVERFIT], cfg, KNOBS)
    patch, changes = to_patch(recs, cfg, KNOBS, top_n=4)
    assert patch == {"model.dropout": 0.3, "optim.weight_decay": 1e-4, "data.noise": 0.05,
                     "model.hidden": 128, "model.latent_dim": 32}
    assert isinstance(patch["model.hidden"], int) and isinstance(patch["model.latent_dim"], int)
    assert [c["key"] for c in changes] == list(patch)
    hidden = changes[3]
    assert hidden["knob"] == "capacity" and (hidden["old"], hidden["new"], hidden["action"]) == (256, 128, "scale")
    assert set(hidden) == {"knob", "key", "old", "new", "action", "rationale", "expected_impact", "risk", "effort"}
    assert to_patch(recs, cfg, KNOBS, top_n=1)[0] == {"model.dropout": 0.3}


def test_scaled_ints_stay_at_least_one_and_floats_stay_clean():
    cfg = config()
    cfg["model"]["hidden"] = 5
    cfg["model"]["latent_dim"] = 1
    rec = {"knob": "capacity", "action": "scale", "value": 0.5, "rationale": "r", "expected_impact": "medium",
           "risk": "low", "effort": "low"}
    patch, changes = to_patch([rec], cfg, KNOBS)
    assert patch == {"model.hidden": 3}  # 2.5 rounds half up; latent_dim 1 cannot shrink and is left out
    lr = {**rec, "knob": "lr", "value": 3.0}
    assert to_patch([lr], cfg, KNOBS)[0] == {"optim.lr": 0.003}


def test_scale_of_a_list_value_scales_each_element():
    cfg = config()
    cfg["model"]["hidden"] = [256, 128]
    rec = {"knob": "capacity", "action": "scale", "value": 2.0, "rationale": "r", "expected_impact": "high",
           "risk": "medium", "effort": "medium"}
    assert to_patch([rec], cfg, KNOBS)[0] == {"model.hidden": [512, 256], "model.latent_dim": 128}


def test_to_patch_skips_knobs_the_trainer_lacks():
    recs = recommend([OVERFIT], config(), KNOBS)
    knobs = {k: v for k, v in KNOBS.items() if k != "dropout"}
    patch, _ = to_patch(recs, config(), knobs, top_n=1)
    assert patch == {"optim.weight_decay": 1e-4}


def test_apply_patch_does_not_mutate_the_input():
    cfg = config()
    before = copy.deepcopy(cfg)
    out = apply_patch(cfg, {"model.dropout": 0.3, "schedule.new_section.value": 2})
    assert cfg == before
    assert out["model"]["dropout"] == 0.3 and out["schedule"]["new_section"]["value"] == 2
    out["optim"]["lr"] = 1.0
    assert cfg["optim"]["lr"] == 1e-3


def test_get_and_set_dotted():
    cfg = config()
    assert get_dotted(cfg, "optim.lr") == 1e-3
    with pytest.raises(KeyError, match="optim.momentum"):
        get_dotted(cfg, "optim.momentum")
    with pytest.raises(KeyError, match="optim.lr.value"):
        get_dotted(cfg, "optim.lr.value")
    set_dotted(cfg, "train.grad_clip", 2.0)
    assert cfg["train"]["grad_clip"] == 2.0
    with pytest.raises(TypeError, match="optim.lr.value"):
        set_dotted(cfg, "optim.lr.value", 1)


def test_diagnosis_to_patch_end_to_end():
    # conftest puts tests/ on sys.path: reuse the planted overfitting curve
    from test_diagnose import METRICS, PRIMARY_MAX, overfitting_max

    findings = diagnose(overfitting_max(), METRICS, PRIMARY_MAX, "max")
    patch, changes = to_patch(recommend(findings, config(), KNOBS), config(), KNOBS, top_n=2)
    assert patch == {"model.dropout": 0.3, "optim.weight_decay": 1e-4}
    assert "gap=" in changes[0]["rationale"]
