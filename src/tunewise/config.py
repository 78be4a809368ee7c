"""Configuration: load, validate (JSON Schema + trainer defaults), merge, override, hash.

Every problem is reported as a ConfigError whose message names the dotted key and what
was expected, so a bad config stops the workflow before any job runs.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
IMPLEMENTED_STRATEGIES = {"auto", "targeted", "sweep", "iterative", "none"}


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def config_hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_dotted(config: dict, key: str) -> Any:
    """`config["optim"]["lr"]` for `"optim.lr"`; KeyError naming the dotted key when the path is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no key {key!r} (missing {part!r})")
        node = node[part]
    return node


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `"optim.lr"` in place, creating missing intermediate sections."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"cannot set {key!r}: {part!r} holds {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.01` -> ("optim.lr", 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


# --- schema validation -------------------------------------------------------------------


def _schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _validator_with_defaults():
    """jsonschema validator that fills `default:` values in, like Snakemake's validate()."""
    from jsonschema import Draft202012Validator, validators

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _schema_message(error) -> str:
    """jsonschema's message; for a oneOf/anyOf ("not valid under any of the given schemas") with the reason
    each alternative gave, so the user learns what was wrong (seeds: 0 -> "less than the minimum of 2")."""
    if error.validator in ("oneOf", "anyOf") and error.context:
        reasons = "; ".join(dict.fromkeys(sub.message for sub in error.context))
        return f"{error.message} ({reasons})"
    return error.message


def validate_schema(config: Any) -> dict:
    if config is None:
        raise ConfigError("config is empty: expected a mapping with an `experiments` key")
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping with an `experiments` key, got {type(config).__name__}")
    config = copy.deepcopy(config)
    validator = _validator_with_defaults()(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        lines = [f"{_key_path(e)}: {_schema_message(e)}" for e in errors[:10]]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    return config


# --- trainer-aware checks ----------------------------------------------------------------

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
            raise ConfigError(f"{dotted}: expected {expected}, got {type(value).__name__} {value!r}")
        if isinstance(default, dict) and isinstance(value, dict) and default and not is_open:
            _check_against_defaults(value, default, dotted, open_keys, rel)


def _check_sweep_space(exp: dict, trainer: Any, resolved: dict, where: str) -> None:
    """The sweep's space is first read by a sweep_trial job, after the baseline and the diagnosis: a bad
    parameter there (bounds swapped, a typo in its key, every parameter removed) is reported now instead."""
    overrides = exp["optimize"]["sweep"]["space"] or {}
    if exp["optimize"]["strategy"] != "sweep" and not overrides:
        return  # no sweep asked for, nothing changed: the trainer's own space is its tests' business
    from tunewise.phases.sweep import SweepError, resolve_space

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
    from tunewise.trainers import get_spec

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
        raise ConfigError(f"{where}.design: the {exp['trainer']} trainer has no design phase (only latent has)")
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
        "name": exp["metric"].get("name") or trainer.primary_metric,
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


def validate(config: Any) -> dict:
    """Schema + per-experiment trainer checks; returns the config with defaults filled."""
    config = validate_schema(config)
    for name in config["experiments"]:
        resolve_experiment(config, name)
    return config


def load_experiment(path: str | os.PathLike) -> dict:
    exp = load_yaml(path)
    if not isinstance(exp, dict) or "baseline" not in exp or "trainer" not in exp:
        raise ConfigError(f"{path}: not a resolved experiment file (run `tunewise resolve` first)")
    return exp
