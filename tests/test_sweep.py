"""The sweep engine in-process: search spaces, every sampler and pruner on a real journal-file study,
slot bookkeeping across killed jobs, and the summary select_best writes."""
from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from tunewise.phases import sweep
from tunewise.trainers.base import Pruned

SPACE = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "model.hidden": {"type": "categorical", "choices": [16, 32, 64]},
    "train.batch_size": {"type": "int", "low": 8, "high": 64, "step": 8},
}
BASE = {"optim": {"lr": 1e-3}, "model": {"hidden": 32}, "train": {"epochs": 6, "batch_size": 16}}


def experiment(sampler="tpe", pruner="median", n_trials=6, direction="max", **extra):
    sweep_cfg = {"sampler": sampler, "pruner": pruner, "n_trials": n_trials, "seed": 0, "storage": None,
                 "epochs": None, "grid_points": 3, "space": {}, "base": "optimized", **extra}
    return {"name": "toy", "metric": {"name": "val/score", "direction": direction}, "optimize": {"sweep": sweep_cfg}}


def curve(params: dict, step: int) -> float:
    """A smooth objective with a known optimum (lr 1e-2, hidden 64) that rises over steps."""
    lr_term = -(math.log10(params["optim.lr"]) + 2.0) ** 2
    return lr_term + params["model.hidden"] / 64 + 0.1 * step - 0.001 * params["train.batch_size"]


class Sink:
    def __init__(self):
        self.rows = []

    def epoch(self, step, row):
        self.rows.append((step, row))

    def replay(self, rows):
        pass


def run_slot(exp, journal, slot, epochs=6):
    """What `tunewise sweep-trial` does around the training, with `curve` standing in for a trainer."""
    study = sweep.open_study(exp, SPACE, BASE, journal, slot)
    trial = study.ask()
    trial.set_user_attr("slot", slot)
    params = sweep.suggest(trial, SPACE)
    reporter = sweep.TrialReporter(Sink(), trial, "val/score", last_step=epochs)
    value = None
    try:
        for step in range(1, epochs + 1):
            value = curve(params, step)
            reporter.epoch(step, {"val/score": value})
    except Pruned as e:
        trial.set_user_attr("reason", str(e))
        study.tell(trial, state=TrialState.PRUNED)
        return study, trial.number
    study.tell(trial, value)
    return study, trial.number


def test_space_overrides_merge_remove_and_validate():
    space = sweep.resolve_space(SPACE, {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                                        "model.hidden": None,
                                        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}})
    assert space["optim.lr"]["low"] == 1e-5 and "model.hidden" not in space and "model.dropout" in space
    with pytest.raises(sweep.SweepError, match=r"space\.optim\.lr: a log-scaled parameter needs low > 0"):
        sweep.resolve_space(SPACE, {"optim.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}})
    with pytest.raises(sweep.SweepError, match=r"space\.x: low 2 must be below high 1"):
        sweep.resolve_space(SPACE, {"x": {"type": "int", "low": 2, "high": 1}})
    with pytest.raises(sweep.SweepError, match=r"space\.c: a categorical parameter needs a non-empty"):
        sweep.resolve_space(SPACE, {"c": {"type": "categorical", "choices": []}})
    with pytest.raises(sweep.SweepError, match="search space is empty"):
        sweep.resolve_space({"a": SPACE["optim.lr"]}, {"a": None})


def test_grid_values_span_each_range():
    g = sweep.grid(SPACE, 3)
    assert g["optim.lr"] == pytest.approx([1e-4, math.sqrt(1e-4 * 1e-1), 1e-1])  # geometric for log
    assert g["model.hidden"] == [16, 32, 64]
    assert g["train.batch_size"] == [8, 40, 64]  # the midpoint 36 snapped to the step of 8


@pytest.mark.parametrize("sampler", sweep.SAMPLERS)
def test_every_sampler_runs_a_study_in_a_journal_file(tmp_path, sampler):
    exp = experiment(sampler=sampler, pruner="none", n_trials=5)
    journal = tmp_path / "study.journal"
    numbers = [run_slot(exp, journal, slot)[1] for slot in range(5)]
    study = sweep.open_study(exp, SPACE, BASE, journal)
    assert sorted(numbers) == list(range(5))
    for slot in range(5):
        t = sweep.finished_trial(study, slot)
        assert t is not None and t.state == TrialState.COMPLETE
        assert 1e-4 <= t.params["optim.lr"] <= 1e-1 and t.params["model.hidden"] in (16, 32, 64)
        assert t.params["train.batch_size"] % 8 == 0
    if sampler == "grid":  # the grid sampler walks distinct grid points
        points = {(t.params["optim.lr"], t.params["model.hidden"], t.params["train.batch_size"]) for t in study.trials}
        assert len(points) == 5


@pytest.mark.parametrize("pruner", sweep.PRUNERS)
def test_every_pruner_builds_and_only_prunes_before_the_last_step(tmp_path, pruner):
    exp = experiment(sampler="random", pruner=pruner, n_trials=8)
    journal = tmp_path / "study.journal"
    for slot in range(8):
        study, _ = run_slot(exp, journal, slot)
    states = [t.state for t in study.trials]
    assert len(states) == 8 and TrialState.COMPLETE in states
    if pruner == "none":
        assert TrialState.PRUNED not in states
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert max(t.intermediate_values) < 6  # never at the last epoch
            assert "pruned by the" in t.user_attrs["reason"]


def test_median_pruner_prunes_a_clearly_worse_trial(tmp_path):
    exp = experiment(sampler="random", pruner="median", n_trials=4)
    study = sweep.open_study(exp, SPACE, BASE, tmp_path / "j", epochs=12)  # warm-up: the first 12 // 4 steps
    for value in (1.0, 1.1):  # two finished trials start the median
        t = study.ask()
        for step in range(1, 13):
            t.report(value + step, step)
        study.tell(t, value + 12)
    t = study.ask()
    reporter = sweep.TrialReporter(Sink(), t, "val/score", last_step=12)
    for step in (1, 2):  # inside the warm-up: not judged yet
        reporter.epoch(step, {"val/score": -5.0})
    with pytest.raises(Pruned, match="MedianPruner at step 3"):
        reporter.epoch(3, {"val/score": -5.0})


def test_killed_trial_is_failed_and_its_slot_reasked_but_finished_slots_are_kept(tmp_path):
    exp = experiment(sampler="random", pruner="none")
    journal = tmp_path / "study.journal"
    run_slot(exp, journal, 0)
    study = sweep.open_study(exp, SPACE, BASE, journal, 1)
    orphan = study.ask()  # a job that died (SIGKILL) after asking, before telling
    orphan.set_user_attr("slot", 1)
    study = sweep.open_study(exp, SPACE, BASE, journal, 1)
    assert sweep.finished_trial(study, 1) is None
    assert sweep.fail_stale(study, 1) == [orphan.number]
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert sweep.finished_trial(study, 1) is None  # an interrupted failure does not finish the slot
    _, again = run_slot(exp, journal, 1)
    study = sweep.open_study(exp, SPACE, BASE, journal)
    assert sweep.finished_trial(study, 1).number == again != orphan.number
    kept = sweep.finished_trial(study, 0)
    assert kept.state == TrialState.COMPLETE and kept.number == 0
    # a trial that diverged is a finished answer for its slot
    t = study.ask()
    t.set_user_attr("slot", 2)
    sweep.tell_failed(study, t, "diverged", "non-finite loss nan at step 3")
    assert sweep.finished_trial(study, 2).user_attrs["reason"] == "non-finite loss nan at step 3"


def test_study_name_changes_with_what_shapes_the_trials():
    a = sweep.study_name(experiment(), SPACE, BASE)
    assert a == sweep.study_name(experiment(), SPACE, BASE)
    assert a != sweep.study_name(experiment(sampler="random"), SPACE, BASE)
    assert a != sweep.study_name(experiment(), {**SPACE, "x": {"type": "int", "low": 1, "high": 2}}, BASE)
    assert a != sweep.study_name(experiment(), SPACE, {**BASE, "train": {"epochs": 7, "batch_size": 16}})


def test_trial_config_sets_dotted_params_on_a_copy():
    config = sweep.trial_config(BASE, {"optim.lr": 0.05, "model.hidden": 64}, epochs=3)
    assert config["optim"]["lr"] == 0.05 and config["model"]["hidden"] == 64 and config["train"]["epochs"] == 3
    assert BASE["optim"]["lr"] == 1e-3 and BASE["train"]["epochs"] == 6


@pytest.mark.parametrize("direction", ["max", "min"])
def test_summary_picks_the_best_complete_slot_in_the_metric_direction(tmp_path, direction):
    exp = experiment(sampler="random", pruner="none", n_trials=4, direction=direction)
    journal = tmp_path / "study.journal"
    study = sweep.open_study(exp, SPACE, BASE, journal)
    values = [0.3, 0.9, 0.5, None]  # slot 3 is pruned
    for slot, value in enumerate(values):
        t = study.ask()
        t.set_user_attr("slot", slot)
        sweep.suggest(t, SPACE)
        t.report(0.95 if value is None else value, 1)  # a pruned trial's early value never wins
        if value is None:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, value)
        run_dir = tmp_path / "trials" / f"trial{slot}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"best_step": 1, "epochs_run": 1, "epochs_planned": 6,
                                                          "primary": {"best": 0.95 if value is None else value}}))
    summary = sweep.summarise(study, exp, SPACE, tmp_path / "trials", 4)
    assert summary["states"] == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 0}
    assert summary["best"]["slot"] == (1 if direction == "max" else 0)
    assert summary["best"]["value"] == (0.9 if direction == "max" else 0.3)
    assert [r["slot"] for r in summary["trials"]] == [0, 1, 2, 3]
    json.dumps(summary)  # sweep.json must be plain JSON


def test_summary_refuses_a_sweep_without_a_complete_trial(tmp_path):
    exp = experiment(sampler="random", pruner="none", n_trials=1)
    study = sweep.open_study(exp, SPACE, BASE, tmp_path / "j")
    t = study.ask()
    t.set_user_attr("slot", 0)
    sweep.tell_failed(study, t, "diverged", "non-finite loss inf at step 1")
    with pytest.raises(sweep.SweepError, match=r"no sweep trial of toy completed.*slot 0: FAIL \(non-finite loss inf"):
        sweep.summarise(study, exp, SPACE, tmp_path / "trials", 1)
    with pytest.raises(sweep.SweepError, match="slot 1 of toy has no finished trial"):
        sweep.summarise(study, exp, SPACE, tmp_path / "trials", 2)


def test_importance_needs_varying_complete_trials(tmp_path):
    exp = experiment(sampler="random", pruner="none", n_trials=12)
    journal = tmp_path / "study.journal"
    numbers = [run_slot(exp, journal, slot)[1] for slot in range(12)]
    study = sweep.open_study(exp, SPACE, BASE, journal)
    imp = sweep.importance(study, numbers)
    assert set(imp) == set(SPACE) and sum(imp.values()) == pytest.approx(1.0)
    assert max(imp, key=imp.get) in ("optim.lr", "model.hidden")  # batch size barely matters in `curve`
    assert sweep.importance(study, numbers[:2]) == {}


def test_sampler_and_pruner_names_are_checked():
    with pytest.raises(sweep.SweepError, match="optimize.sweep.sampler: unknown sampler 'bohb'"):
        sweep.make_sampler("bohb", 0, SPACE, 3)
    with pytest.raises(sweep.SweepError, match="optimize.sweep.pruner: unknown pruner 'asha'"):
        sweep.make_pruner("asha", 10, 8)
    assert isinstance(sweep.make_pruner("hyperband", 10, 8), optuna.pruners.HyperbandPruner)
