"""Configuration: load, validate (JSON Schema + trainer defaults), merge, override, hash.

Every problem is reported as a ConfigError whose message names the dotted key and what
was expected, so a bad config stops the workflow before any job runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


# what YAML 1.1 (PyYAML) reads as a string although a person means a number: an exponent without a dot
# ("3e-4", "1E5"); YAML 1.2 and Python read them as floats
YAML11_FLOAT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def yaml11_float_hint(value: Any) -> str:
    """The fix for a number YAML 1.1 read as text, or "" when `value` is not one."""
    if isinstance(value, str) and YAML11_FLOAT.match(value.strip()):
        mantissa, _, exponent = value.strip().lower().partition("e")
        return (f" (YAML 1.1 reads {value!r} as text, not a number: write it with a dot, "
                f"{mantissa}.0e{exponent}, or as {float(value):g})")
    return ""


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: key {key!r} appears twice in the same mapping (first at line {first}); "
                         "YAML would keep only the last one silently: remove or rename one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping (a repeated experiment name would otherwise drop
    the first experiment without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, seen[key])
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# a config is a few hundred values; anchors and aliases (`&defaults` ... `*defaults`) may repeat blocks, but a
# file whose aliases expand past this is an alias bomb: every reader after the parser (the schema's validation,
# Snakemake's deep copies) walks the expansion and never ends
MAX_EXPANDED_VALUES = 100_000


class AliasBombError(yaml.YAMLError):
    pass


def _expanded_size(node, memo: dict) -> int:
    """How many values the document becomes once every alias is expanded (a node shared through an alias is
    counted each time it is used, computed once)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias (a node inside itself) counts once instead of looping
        if isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(v, memo) for v in node.value)
        else:
            memo[key] = 1
    return memo[key]


def _safe_load_unique(stream) -> Any:
    """yaml.safe_load with _UniqueKeyLoader (a SafeLoader: no Python objects are built from the file), refusing
    a document whose aliases expand past MAX_EXPANDED_VALUES."""
    loader = _UniqueKeyLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_EXPANDED_VALUES:
            raise AliasBombError(f"its &anchors and *aliases expand to {size:,} values (a config has hundreds; the "
                                 f"limit is {MAX_EXPANDED_VALUES:,}): an alias bomb, or aliases nested by mistake")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike) -> Any:
    from tunewise.paths import path_kind

    path = Path(path)
    try:
        kind = path_kind(path)
    except OSError as e:  # a path component that is a file, no permission
        raise ConfigError(f"{path}: cannot be read as a config file: {e.strerror}") from None
    if kind == "missing":
        raise ConfigError(f"config file not found: {path}")
    if kind == "dangling":
        raise ConfigError(f"config file not found: {path} (a symlink to {os.readlink(path)}, which does not exist)")
    if kind == "loop":
        raise ConfigError(f"config file not found: {path} (a symlink loop: it links back to itself)")
    if kind == "folder":
        raise ConfigError(f"{path}: is a directory, not a config file (give the YAML file in it, e.g. "
                          f"{path / 'config.yaml'})")
    try:
        with open(path, encoding="utf-8") as f:
            return _safe_load_unique(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read as a config file: {e.strerror}") from None
    except (DuplicateKeyError, AliasBombError) as e:
        raise ConfigError(f"{path}: {e}") from None
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
    each alternative gave, so the user learns what was wrong (seeds: 0 -> "less than the minimum of 2"); for a
    number YAML 1.1 read as text, how to write it."""
    hint = yaml11_float_hint(error.instance) if error.validator in ("type", "oneOf", "anyOf") else ""
    if error.validator in ("oneOf", "anyOf") and error.context:
        reasons = "; ".join(dict.fromkeys(sub.message for sub in error.context))
        return f"{error.message} ({reasons}){hint}"
    return error.message + hint


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

def load_experiment(path: str | os.PathLike) -> dict:
    exp = load_yaml(path)
    if not isinstance(exp, dict) or "baseline" not in exp or "trainer" not in exp:
        raise ConfigError(f"{path}: not a resolved experiment file (run `tunewise resolve` first)")
    return exp


# --- the optimization config, commented ------------------------------------------------------

RATIONALE_WIDTH = 100  # a config comment stays on one readable line


def _inline(value: Any) -> str:
    """A value as one line of YAML flow notation (what a reader would type back into the config)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):  # PyYAML's end-of-document marker after a bare scalar
        text = text[: -len("\n...")]
    return " ".join(text.split())


def _one_line(text: Any, width: int = RATIONALE_WIDTH) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> 0-based line where a comment for that key belongs.

    Found from the YAML node tree, so `optim.lr` and `schedule.lr` are told apart by their
    nesting, not by the bare key name. A scalar (or one-line flow collection) takes the comment
    on the line where its value ends; a block collection on its key's line.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    found: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            block = isinstance(value_node, (yaml.MappingNode, yaml.SequenceNode)) and not value_node.flow_style
            if block:
                found[path] = key_node.start_mark.line
            else:
                end = value_node.end_mark
                found[path] = end.line - 1 if end.column == 0 and end.line > key_node.start_mark.line else end.line
            walk(value_node, path + ".")

    if root is not None:
        walk(root, "")
    return found


def commented_config(config: dict, changes: list[dict]) -> str:
    """YAML of `config` where every changed key says what it was and why.

    `yaml.safe_load` of the result gives back `config` exactly: the notes are comments only.
    """
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    lines = body.splitlines()
    where = _key_lines(body)
    header = ["# optimization_config.yaml: the baseline config with the Phase 3 recommendations applied"]
    if changes:
        header.append(f"# Changes from the baseline config ({len(changes)}):")
    else:
        header.append("# No changes from the baseline config.")
    for change in changes:
        key = change.get("key") or change.get("knob") or "?"
        why = _one_line(change.get("rationale"))
        how = ", ".join(f"{k} {change[k]}" for k in ("knob", "action") if change.get(k))
        header.append(
            f"#   {key}: {_inline(change.get('old'))} -> {_inline(change.get('new'))}"
            + (f" ({how})" if how else "") + (f": {why}" if why else "")
        )
        line = where.get(key)
        if line is not None:
            lines[line] += f"  # CHANGED from {_inline(change.get('old'))}" + (f": {why}" if why else "")
    return "\n".join(header + lines) + "\n"
