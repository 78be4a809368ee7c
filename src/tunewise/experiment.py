"""A whole config validated and one experiment resolved: the schema, then each experiment against its
trainer's spec (default config, checks, search space). Above the trainers (it asks them for their specs) and
below the phases; torch-free, since the Snakefile parse runs it before any job.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any

from tunewise.config import ConfigError, deep_merge, get_dotted, validate_schema, yaml11_float_hint
from tunewise.trainers import get_spec
from tunewise.trainers.base import capability

IMPLEMENTED_STRATEGIES = {"auto", "targeted", "sweep", "iterative", "none"}
_NUMBER = (int, float)


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
            expected = "number" if isinstance(default, float) else type(default).__name__
            raise ConfigError(f"{dotted}: expected {expected}, got {type(value).__name__} {value!r}"
                              f"{yaml11_float_hint(value)}")
        if isinstance(default, dict) and isinstance(value, dict) and default and not is_open:
            _check_against_defaults(value, default, dotted, open_keys, rel)


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
        try:
            get_dotted(resolved, key)
        except KeyError:
            # trial_config would create the key, and the trainer would never read it: a sweep of nothing
            close = difflib.get_close_matches(key, _leaf_keys(resolved), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{where}.optimize.sweep.space.{key}: not a key of the {exp['trainer']} trainer's config "
                f"({hint}sweep parameters are dotted config keys such as optim.lr)"
            ) from None


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
        trainer.check_config(resolved)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from None
    _check_sweep_space(exp, trainer, resolved, where)
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
