import copy

import pytest
import yaml

from tunewise.config import ConfigError, config_hash, deep_merge, load_yaml, parse_override
from tunewise.experiment import resolve_experiment, validate


def base_config(**exp):
    cfg = {"experiments": {"e1": {"trainer": "toy_trainer:ToyTrainer", **exp}}}
    return cfg


def test_defaults_are_filled_and_resolution_merges_trainer_defaults():
    cfg = validate(base_config(baseline={"optim": {"lr": 0.05}}))
    exp = cfg["experiments"]["e1"]
    assert exp["significance"]["alpha"] == 0.05 and exp["significance"]["seeds"] == 5
    assert exp["optimize"]["strategy"] == "auto"
    resolved = resolve_experiment(cfg, "e1")
    assert resolved["baseline"]["optim"]["lr"] == 0.05
    assert resolved["baseline"]["optim"]["name"] == "adam"  # from the trainer's defaults
    assert resolved["significance"]["seeds"] == [0, 1, 2, 3, 4]
    assert resolved["metric"] == {"name": "val/neg_mse", "direction": "max"}


@pytest.mark.parametrize(
    "exp, needle",
    [
        ({"trainer": "nosuch"}, "experiments.e1.trainer: unknown trainer 'nosuch'"),
        ({"significance": {"alpha": "0.05"}}, "experiments.e1.significance.alpha"),
        ({"significance": {"seeds": 1}}, "experiments.e1.significance.seeds"),
        ({"baseline": {"optim": {"lr": "fast"}}}, "experiments.e1.baseline.optim.lr: expected number"),
        ({"baseline": {"optim": {"lrr": 0.1}}}, "did you mean 'lr'"),
        ({"optimize": {"strategy": "magic"}}, "experiments.e1.optimize.strategy"),
        ({"device": "tpu"}, "experiments.e1.device"),
        ({"bogus": 1}, "'bogus' was unexpected"),
    ],
)
def test_bad_values_name_the_key(exp, needle):
    cfg = base_config()
    cfg["experiments"]["e1"].update(exp)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_experiment_names_are_restricted_to_safe_words():
    with pytest.raises(ConfigError, match="experiments"):
        validate({"experiments": {"a;rm -rf /": {"trainer": "toy_trainer:ToyTrainer"}}})


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_latent_missing_data_path_is_named(tmp_path):
    cfg = {"experiments": {"m": {"trainer": "latent", "data": {"source": "path", "path": str(tmp_path / "x.csv")}}}}
    with pytest.raises(ConfigError, match=r"experiments\.m: data\.path: file not found"):
        validate(cfg)


def test_default_config_files_are_valid(repo):
    for name in ("config.yaml", "test.yaml"):
        validate(yaml.safe_load((repo / "config" / name).read_text()))


def test_helpers():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert parse_override("optim.lr=0.01") == ("optim.lr", 0.01)
    a = {"x": [1, 2], "y": {"z": 1}}
    assert config_hash(a) == config_hash(copy.deepcopy(a)) != config_hash({"x": [2, 1], "y": {"z": 1}})


def _latent(**exp):
    return {"experiments": {"m": {"trainer": "latent", "data": {"source": "embedded"}, **exp}}}


def test_design_block_becomes_the_trainer_configs_design_section():
    cfg = validate(_latent(design={"restarts": 8, "alpha": 0.25, "bounds": [-3, 3],
                                   "constraints": [{"task": "kappa_p", "max": 10.0}]}))
    exp = resolve_experiment(cfg, "m")
    design = exp["baseline"]["design"]
    assert design["restarts"] == 8 and design["alpha"] == 0.25 and design["bounds"] == [-3, 3]
    assert design["steps"] == 300 and design["objectives"][0]["task"] == "PF_p"  # the trainer's defaults
    assert "design" not in exp  # one place: the trainer config, where the optimisation phases can tune it


@pytest.mark.parametrize("exp, needle", [
    ({"design": {"restart": 8}}, "experiments.m.design.restart: unknown key (did you mean 'restarts'?)"),
    ({"design": {"steps": "many"}}, "experiments.m.design.steps: expected int"),
    ({"design": {"objectives": [{"task": "zT"}]}}, "design.objectives[0].task: 'zT' is not a target column"),
    ({"design": {"plateau": {"factr": 0.5}}}, "experiments.m.design.plateau.factr: unknown key"),
    ({"baseline": {"design": {"steps": 5}}}, "experiments.m.baseline.design: put these settings under experiments.m.design"),
])
def test_bad_design_blocks_name_the_key(exp, needle):
    with pytest.raises(ConfigError) as e:
        validate(_latent(**exp))
    assert needle in str(e.value)


def test_design_block_on_a_trainer_without_design_is_refused():
    with pytest.raises(ConfigError, match=r"experiments.e1.design: the toy_trainer:ToyTrainer trainer has no design phase"):
        validate(base_config(design={"restarts": 4}))


def test_design_enabled_only_for_a_trainer_with_design_left_on():
    from tunewise.experiment import design_enabled

    assert design_enabled(resolve_experiment(validate(_latent()), "m"))
    assert not design_enabled(resolve_experiment(validate(_latent(design={"enabled": False})), "m"))
    assert not design_enabled(resolve_experiment(validate(base_config()), "e1"))


def test_request_gpus_is_a_checked_top_level_switch():
    assert validate(base_config())["request_gpus"] == "auto"
    assert validate({**base_config(), "request_gpus": "always"})["request_gpus"] == "always"
    with pytest.raises(ConfigError, match=r"request_gpus: 'sometimes' is not one of \['auto', 'always', 'never'\]"):
        validate({**base_config(), "request_gpus": "sometimes"})


def test_a_module_class_trainer_is_found_from_the_working_directory(tmp_path, repo):
    """`tunewise` (a console script) must import `pkg.mod:Class` from where the workflow runs, as the Snakefile
    parse does, without the user setting PYTHONPATH."""
    import os
    import subprocess
    import sys

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    (tmp_path / "mine" / "trainer.py").write_text((repo / "tests" / "toy_trainer.py").read_text())
    (tmp_path / "c.yaml").write_text("experiments:\n  e1:\n    trainer: mine.trainer:ToyTrainer\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tunewise = [sys.executable, "-P", "-c",  # -P: no cwd on sys.path, like a console script
                "import sys; from tunewise.cli import main; sys.exit(main())"]
    ok = subprocess.run([*tunewise, "validate", "c.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "c.yaml: valid (e1)" in ok.stdout, ok.stderr
    (tmp_path / "c.yaml").write_text("experiments:\n  e1:\n    trainer: mine.nothere:ToyTrainer\n")
    bad = subprocess.run([*tunewise, "validate", "c.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot import module 'mine.nothere'" in bad.stderr, bad.stderr
