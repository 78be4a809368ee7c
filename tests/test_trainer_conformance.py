"""Every trainer the workflow can be given honours the protocol of tunewise/trainers/base.py: the three built-in
ones (spec and trainer), the test suite's ToyTrainer and the example of examples/ that the README points users
to. What the phases rely on is checked for each: the declared names, knobs and search space point at keys of
the trainer's own default config, the default config passes its own checks, and (for the two small trainers)
prepare_data -> run -> evaluate_test produces what the run directory contract and finalize read."""
from __future__ import annotations

import copy
import math

import pytest

from tunewise.config import get_dotted, set_dotted
from tunewise.devices import resolve_device
from tunewise.runs import RunDir
from tunewise.tracking import EpochReporter
from tunewise.trainers import BUILTIN, budget_key, get_spec, get_trainer
from tunewise.trainers.base import Trainer

from e2e_support import REPO

SMALL = ["toy_trainer:ToyTrainer", "examples.my_trainer:MyTrainer"]
ALL = [*sorted(BUILTIN), *SMALL]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # examples/ is imported from the repository root, as users run it
    monkeypatch.chdir(REPO)


def _declared(name: str):
    return get_spec(name) if name in BUILTIN else get_trainer(name)


@pytest.mark.parametrize("name", ALL)
def test_the_declared_side_points_at_the_trainers_own_config(name):
    trainer = _declared(name)
    defaults = trainer.default_config()
    assert isinstance(trainer.name, str) and trainer.name
    assert trainer.direction in ("max", "min")
    assert trainer.primary_metric.startswith("val/"), "the diagnosis and significance read a validation metric"
    assert isinstance(trainer.open_config_keys, set)
    for knob, keys in trainer.knobs.items():
        for key in [keys] if isinstance(keys, str) else keys:
            get_dotted(defaults, key)  # KeyError names a knob that points nowhere
    assert isinstance(get_dotted(defaults, budget_key(trainer)), int)
    for key, spec in trainer.search_space().items():
        get_dotted(defaults, key)
        assert spec["type"] in ("float", "int", "categorical"), key
    assert {"source"} <= set(defaults["data"]) or name in SMALL
    trainer.check_config(copy.deepcopy(defaults))  # its own defaults pass its own checks
    assert trainer.default_config() == defaults and trainer.default_config() is not defaults  # a fresh copy


@pytest.mark.parametrize("name", ALL)
def test_the_trainer_that_trains_is_a_protocol_trainer(name):
    assert isinstance(get_trainer(name), Trainer)


@pytest.mark.parametrize("name", SMALL)
def test_prepare_run_and_evaluate_give_what_the_phases_read(name, tmp_path):
    trainer = get_trainer(name)
    config = trainer.default_config()
    config["data"]["prepared_dir"] = str(tmp_path / "data")
    set_dotted(config, budget_key(trainer), 3)
    info = trainer.prepare_data(config["data"], tmp_path / "data", threads=1)
    assert isinstance(info, dict)
    run = RunDir(tmp_path / "run")
    run.start(config, 0)
    reported = []

    class Reporter(EpochReporter):
        def epoch(self, step, row):
            reported.append((step, dict(row)))
            super().epoch(step, row)

    metric = {"name": trainer.primary_metric, "direction": trainer.direction}
    device = resolve_device("cpu")
    metrics = trainer.run(config, 0, run, Reporter(None, None), device, metric)
    assert [step for step, _ in reported] == [1, 2, 3]
    assert all(trainer.primary_metric in row and "train/loss" in row for _, row in reported)
    assert math.isfinite(float(metrics["primary"]["best"])) and metrics["primary"]["name"] == trainer.primary_metric
    assert (run.checkpoints / "best.pt").exists() and (run.checkpoints / "last.pt").exists()
    test = trainer.evaluate_test(config, run.checkpoints / "best.pt", device, tmp_path / "test")
    assert test and all(k.startswith("test/") and math.isfinite(float(v)) for k, v in test.items()), test


@pytest.mark.parametrize("name", [*ALL, "toy_trainer:CapableToy"])
def test_the_optional_capabilities_have_the_protocols_shapes(name):
    """Declared or defaulted (trainers/base.py: Capabilities), each capability answers in the form the phases
    and the workflow read; no trainer's answer depends on which trainer it is."""
    import pandas as pd

    from tunewise.phases.diagnose import DEFAULT_THRESHOLDS
    from tunewise.reports.sections import load_section
    from tunewise.trainers.base import capability

    trainer = _declared(name)
    config = trainer.default_config()
    steps = capability(trainer, "preparation_steps")(config)
    assert isinstance(steps, dict) and all(isinstance(k, str) and k.isidentifier() for k in steps)
    assert all(isinstance(v, str) and v for v in steps.values())
    for target in capability(trainer, "report_sections"):
        assert callable(load_section(target))
    thresholds = capability(trainer, "diagnosis_thresholds")
    assert isinstance(thresholds, dict) and all(isinstance(v, (int, float)) for v in thresholds.values())
    history = pd.DataFrame({"step": [1, 2, 3], trainer.primary_metric: [0.1, 0.2, 0.3], "train/loss": [3.0, 2.0, 1.0]})
    findings = capability(trainer, "extra_findings")(history, {"status": "done"}, {**DEFAULT_THRESHOLDS, **thresholds})
    assert isinstance(findings, list)
    patterns = capability(trainer, "recommendation_patterns")()
    assert isinstance(patterns, dict) and all(callable(p) for p in patterns.values())
    for finding in findings:  # a finding of its own is one its patterns turn into a change of its knobs
        assert finding["root_cause"] in patterns
        for knob, *_ in patterns[finding["root_cause"]](finding, config, trainer.knobs):
            assert knob in trainer.knobs


def test_a_trainer_without_a_step_refuses_one():
    from tunewise.trainers.base import capability

    with pytest.raises(KeyError, match="no preparation step 'x'"):
        capability(get_trainer("toy_trainer:ToyTrainer"), "prepare_step")("x", {}, REPO, 1)
