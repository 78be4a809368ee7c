"""A whole config validated and one experiment resolved: the schema, then each experiment against its
trainer's spec (default config, checks, search space). Above the trainers (it asks them for their specs) and
below the phases; torch-free, since the Snakefile parse runs it before any job.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from typing import Any

from tunewise.config import ConfigError, deep_merge, get_dotted, set_dotted, validate_schema, yaml11_float_hint
from tunewise.devices import cuda_expected
from tunewise.thresholds import unknown_thresholds
from tunewise.train.options import check_training_options
from tunewise.trainers import get_spec
from tunewise.trainers.base import capability

IMPLEMENTED_STRATEGIES = {"auto", "targeted", "sweep", "iterative", "none"}
_NUMBER = (int, float)
# no setting of any trainer or phase is meaningful beyond this magnitude: 1e308 or 1e10 is a typo (a seed excepted)
ABSURD = 1e9
# a learning rate above this diverges whatever the model; at or below zero nothing trains
MAX_LR = 10.0


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True  # None defaults mean "optional / any"; None values mean "off"
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, _NUMBER):
        return isinstance(value, _NUMBER) and not isinstance(value, bool) and (
            isinstance(default, float) or isinstance(value, int)
        )
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _check_against_defaults(values: dict, defaults: dict, where: str, open_keys: set[str], key_path: str = "") -> None:
    """Unknown keys and wrong types against the trainer's defaults. `key_path` is the trainer-config key of
    `values` (e.g. "optim"); an open key's value (a user-named mapping, or a value of several shapes such as
    design.bounds) is left to the trainer's check_config."""
    for key, value in values.items():
        dotted = f"{where}.{key}"
        rel = f"{key_path}.{key}" if key_path else key
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; known keys: {', '.join(sorted(defaults))}")
        default, is_open = defaults[key], rel in open_keys
        # an open mapping must still be a mapping; an open scalar may take any shape
        if not _type_ok(default, value) and not (is_open and not isinstance(default, dict)):
            raise _type_error(dotted, default, value)
        if isinstance(default, dict) and isinstance(value, dict) and default and not is_open:
            _check_against_defaults(value, default, dotted, open_keys, rel)


def _type_error(at: str, default: Any, value: Any) -> ConfigError:
    expected = "number" if isinstance(default, float) else type(default).__name__
    return ConfigError(f"{at}: expected {expected}, got {type(value).__name__} {value!r}{yaml11_float_hint(value)}")


def _config_value(resolved: dict, key: str, at: str, trainer: str, what: str) -> Any:
    """The value of dotted `key` in the trainer's resolved config, or an error naming the closest key there."""
    try:
        return get_dotted(resolved, key)
    except KeyError:
        close = difflib.get_close_matches(key, _leaf_keys(resolved), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{at}: not a key of the {trainer} trainer's config ({hint}{what} are dotted config keys "
                          f"such as optim.lr)") from None


def _check_sweep_space(exp: dict, trainer: Any, resolved: dict, where: str) -> None:
    """The sweep's space is first read by a sweep_trial job, after the baseline and the diagnosis: a bad
    parameter there (bounds swapped, a typo in its key, every parameter removed) is reported now instead."""
    overrides = exp["optimize"]["sweep"]["space"] or {}
    if exp["optimize"]["strategy"] != "sweep" and not overrides:
        return  # no sweep asked for, nothing changed: the trainer's own space is its tests' business
    from tunewise.space import SweepError, resolve_space

    try:
        resolve_space(trainer.search_space(), overrides)
    except SweepError as e:
        raise ConfigError(f"{where}.{e}") from None
    open_keys = getattr(trainer, "open_config_keys", set())
    for key, spec in overrides.items():
        if spec is None or any(key.startswith(k + ".") for k in open_keys):
            continue
        # trial_config would create a missing key, and the trainer would never read it: a sweep of nothing
        _config_value(resolved, key, f"{where}.optimize.sweep.space.{key}", exp["trainer"], "sweep parameters")


def _check_numbers(value: Any, where: str) -> None:
    """NaN, infinities and absurd magnitudes anywhere in an experiment's settings, the key named: YAML reads
    `.nan`, `.inf` and `1e308` as numbers, and a schema's `minimum` lets NaN through (NaN < x is false)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_numbers(item, f"{where}[{i}]")
    elif isinstance(value, _NUMBER) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {value} is not a finite number")
        if abs(value) > ABSURD and "seed" not in where.rsplit(".", 1)[-1]:
            raise ConfigError(f"{where}: {value:g} is far beyond any sensible setting (|value| > {ABSURD:g}); a typo?")


def _check_learning_rates(resolved: dict, where: str) -> None:
    for key in _leaf_keys(resolved):
        value = get_dotted(resolved, key)
        if key.rsplit(".", 1)[-1] == "lr" and isinstance(value, _NUMBER) and not isinstance(value, bool):
            if not 0 < value <= MAX_LR:
                raise ConfigError(f"{where}.{key}: a learning rate must be in (0, {MAX_LR:g}], got {value:g}")


def _check_overrides(exp: dict, trainer: Any, resolved: dict, where: str) -> None:
    """optimize.overrides is applied after the diagnosis: a key the trainer does not have, a value of the wrong
    type or one its checks refuse would fail there, after the baseline trained."""
    overrides = exp["optimize"].get("overrides") or {}
    if not overrides:
        return
    open_keys = getattr(trainer, "open_config_keys", set())
    patched = copy.deepcopy(resolved)
    for key, value in overrides.items():
        at = f"{where}.optimize.overrides.{key}"
        if not any(key == k or key.startswith(k + ".") for k in open_keys):
            old = _config_value(resolved, key, at, exp["trainer"], "overrides")
            if isinstance(old, dict) and not isinstance(value, dict):
                raise ConfigError(f"{at}: {key} is a block of settings ({', '.join(sorted(old))}); name one of them")
            if not _type_ok(old, value):
                raise _type_error(at, old, value)
        set_dotted(patched, key, value)
    _check_learning_rates(patched, f"{where}.optimize.overrides")
    try:
        trainer.check_config(patched)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}.optimize.overrides: the config they make cannot run: {e}") from None


def _check_grid(exp: dict, trainer: Any, where: str) -> None:
    """A grid sampler runs out of points: trials beyond the grid's size would repeat points or fail."""
    sweep = exp["optimize"]["sweep"]
    if sweep["sampler"] != "grid":
        return
    from tunewise.space import SweepError, grid, grid_size, resolve_space

    try:
        space = resolve_space(trainer.search_space(), sweep["space"] or {})
    except SweepError:
        return  # _check_sweep_space names the problem when the sweep is asked for
    size = grid_size(space, int(sweep["grid_points"]))
    if sweep["n_trials"] > size:
        per = ", ".join(f"{k}: {len(v)}" for k, v in grid(space, int(sweep["grid_points"])).items())
        raise ConfigError(f"{where}.optimize.sweep.n_trials: {sweep['n_trials']} trials, but the grid has only {size} "
                          f"points ({per}); set n_trials: {size}, or raise sweep.grid_points")


def _check_metric(exp: dict, trainer: Any, resolved: dict, where: str) -> None:
    """The metric the runs are selected on must be one the trainer writes, or every run fails after its first
    epoch. A trainer lists them (patterns allowed) in `metric_names(config)`; None: not checked."""
    name = (exp.get("metric") or {}).get("name")
    if not name:
        return
    known = capability(trainer, "metric_names")(resolved)
    if known is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in known):
        return
    close = difflib.get_close_matches(name, [k for k in known if "*" not in k], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{where}.metric.name: the {exp['trainer']} trainer writes no metric {name!r} ({hint}it "
                      f"writes: {', '.join(known)})")


def _check_thresholds(exp: dict, trainer: Any, where: str) -> None:
    from tunewise.thresholds import DEFAULT_THRESHOLDS

    own = capability(trainer, "diagnosis_thresholds")
    given = (exp.get("diagnose") or {}).get("thresholds") or {}
    for key in unknown_thresholds(given, own):
        close = difflib.get_close_matches(key, [*DEFAULT_THRESHOLDS, *own], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}.diagnose.thresholds.{key}: not a diagnosis threshold{hint}; known: "
                          f"{', '.join(sorted({*DEFAULT_THRESHOLDS, *own}))}")


def _check_device(exp: dict, where: str, request_gpus: str) -> None:
    """`device: cuda` on a host without an NVIDIA GPU fails in every training job; `auto` falls back to the CPU.
    A cluster's login node has no GPU where its compute nodes do: `request_gpus: always` says so."""
    if exp["device"] == "cuda" and request_gpus != "always" and not cuda_expected():
        raise ConfigError(f"{where}.device: cuda, but this host has no NVIDIA GPU (no driver, or "
                          "CUDA_VISIBLE_DEVICES hides them); use device: auto to fall back to the CPU, or, when the "
                          "jobs run on a cluster's GPU nodes, set request_gpus: always")


def _leaf_keys(config: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        out.extend(_leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted])
    return out


def resolve_experiment(config: dict, name: str) -> dict:
    """The fully resolved experiment: schema defaults, trainer defaults, data and baseline merged.

    The result is what every CLI verb reads (results/<exp>/experiment.yaml)."""
    exp = copy.deepcopy(config["experiments"][name])
    where = f"experiments.{name}"
    _check_numbers(exp, where)
    _check_device(exp, where, config.get("request_gpus", "auto"))
    if exp["optimize"]["strategy"] not in IMPLEMENTED_STRATEGIES:
        raise ConfigError(
            f"{where}.optimize.strategy: {exp['optimize']['strategy']!r} is not available in this version "
            f"(available: {', '.join(sorted(IMPLEMENTED_STRATEGIES))})"
        )
    try:
        trainer = get_spec(exp["trainer"])  # no torch: the Snakefile parse validates every experiment
    except (KeyError, ImportError, AttributeError) as e:
        # args[0], not str(e): a KeyError's str() is the repr of its message, quotes and all
        raise ConfigError(f"{where}.trainer: {e.args[0] if e.args else e}") from None
    defaults = trainer.default_config()
    _check_against_defaults(exp["data"], defaults["data"], f"{where}.data", trainer.open_config_keys, "data")
    _check_against_defaults(exp["baseline"], defaults, f"{where}.baseline", trainer.open_config_keys)
    for section in ("data", "design"):
        if section in exp["baseline"]:
            raise ConfigError(f"{where}.baseline.{section}: put these settings under {where}.{section}")
    if "design" in defaults:
        # the design block is part of the trainer config: the optimisation phases can tune its knobs
        _check_against_defaults(exp["design"], defaults["design"], f"{where}.design", trainer.open_config_keys, "design")
    elif exp["design"]:
        raise ConfigError(f"{where}.design: the {exp['trainer']} trainer has no design phase (a trainer has one "
                          f"when its default config has a design block)")
    resolved = deep_merge(defaults, {"data": exp["data"]})
    if "design" in defaults:
        resolved = deep_merge(resolved, {"design": exp["design"]})
    resolved = deep_merge(resolved, exp["baseline"])
    try:
        check_training_options(resolved)  # the shared optim/schedule/train/model keys, for any trainer
    except ValueError as e:
        raise ConfigError(f"{where}: baseline.{e}") from None
    try:
        trainer.check_config(resolved)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from None
    _check_learning_rates(resolved, f"{where}.baseline")
    _check_sweep_space(exp, trainer, resolved, where)
    _check_grid(exp, trainer, where)
    _check_overrides(exp, trainer, resolved, where)
    _check_metric(exp, trainer, resolved, where)
    _check_thresholds(exp, trainer, where)
    seeds = exp["significance"]["seeds"]
    exp["significance"]["seeds"] = list(range(seeds)) if isinstance(seeds, int) else seeds
    exp["metric"] = {
        # a trainer whose metric depends on the data (captions or none, say) gives it for this config
        "name": exp["metric"].get("name") or capability(trainer, "primary_metric_for")(resolved),
        "direction": exp["metric"].get("direction") or trainer.direction,
    }
    exp["name"] = name
    exp["baseline"] = resolved
    exp.pop("data")
    exp.pop("design")
    exp["tracking"] = {"uri": config.get("tracking", {}).get("uri")}
    return exp


def design_enabled(exp: dict) -> bool:
    """Whether a resolved experiment ends with a design phase: its trainer has one and it is not switched off."""
    design = exp["baseline"].get("design")
    return isinstance(design, dict) and bool(design.get("enabled", True))


def preparation_steps(exp: dict) -> list[str]:
    """The preparation steps a resolved experiment's trainer declares for its config, in order (no torch)."""
    try:
        return list(capability(get_spec(exp["trainer"]), "preparation_steps")(exp["baseline"]))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"experiments.{exp['name']}: preparation steps: {e}") from None


def validate(config: Any) -> dict:
    """Schema + per-experiment trainer checks; returns the config with defaults filled."""
    config = validate_schema(config)
    for name in config["experiments"]:
        resolve_experiment(config, name)
    return config
