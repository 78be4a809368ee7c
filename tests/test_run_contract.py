"""The run-directory contract's readers (tunewise.runs) and the one diagnosis plan of Phase 3 and the rounds."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tunewise.runs import RunDir, finite_float, read_history, write_json, read_json


@pytest.mark.parametrize("value, expected", [
    (1.5, 1.5), (3, 3.0), ("0.25", 0.25), (np.float32(2.0), 2.0),
    (None, None), (True, None), ("inf", None), ("-inf", None), (math.nan, None), ("words", None), ([1], None),
])
def test_finite_float_reads_back_what_write_json_wrote(value, expected):
    assert finite_float(value) == expected


def test_infinities_survive_a_round_trip_as_strings_and_read_back_as_not_finite(tmp_path):
    write_json(tmp_path / "m.json", {"best": math.inf, "worst": -math.inf, "nan": math.nan, "ok": 0.5})
    back = read_json(tmp_path / "m.json")
    assert back == {"best": "inf", "worst": "-inf", "nan": None, "ok": 0.5}
    assert [finite_float(v) for v in back.values()] == [None, None, None, 0.5]


def test_history_of_a_run_without_epochs_is_an_empty_frame(tmp_path):
    run = RunDir(tmp_path / "run")
    assert read_history(run.path).empty and run.history().empty and run.metrics() == {}
    run.path.mkdir()
    run.history_path.write_text("")
    assert run.history().empty
    run.write_history([{"step": 1, "val/loss": 0.5}, {"step": 2, "val/loss": 0.25}])
    assert list(run.history()["val/loss"]) == [0.5, 0.25]


def test_diagnosis_plan_applies_the_overrides_that_change_something(tmp_path):
    import torch

    from tunewise.config import validate_schema
    from tunewise.experiment import resolve_experiment
    from tunewise.phases.diagnose import plan
    from toy_trainer import ToyTrainer

    class Quiet:
        def epoch(self, step, row):
            pass

        def replay(self, rows):
            pass

    raw = {"trainer": "toy_trainer:ToyTrainer", "baseline": {"train": {"epochs": 3}},
           "optimize": {"overrides": {"model.dropout": 0.1, "train.batch_size": 32}}}
    exp = resolve_experiment(validate_schema({"experiments": {"toy": raw}}), "toy")
    run = RunDir(tmp_path / "run")
    run.start(exp["baseline"], exp["seed"])
    run.finish(ToyTrainer().run(exp["baseline"], exp["seed"], run, Quiet(), torch.device("cpu"), exp["metric"],
                                progress=False))
    p = plan(exp, run.path)
    assert p["patch"]["model.dropout"] == 0.1
    override = [c for c in p["changes"] if c["rationale"] == "user override (optimize.overrides)"]
    # the baseline already trains batch 32: that override changes nothing and is no change
    assert [c["key"] for c in override] == ["model.dropout"] and "train.batch_size" not in p["patch"]
