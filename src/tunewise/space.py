"""A sweep's search space: the trainer's default space with the experiment's overrides, checked.

Below the phases, so that config validation (the Snakefile parse) checks a sweep's space without Optuna and
without importing a phase; phases/sweep.py samples from it.
"""
from __future__ import annotations

import copy


class SweepError(ValueError):
    """A sweep setting that cannot work (message names the key)."""


def resolve_space(default: dict, overrides: dict | None) -> dict:
    """The trainer's default space with the experiment's overrides merged over it; `key: null` removes a key."""
    space = copy.deepcopy(default)
    for key, spec in (overrides or {}).items():
        if spec is None:
            space.pop(key, None)
        else:
            space[key] = {**space.get(key, {}), **spec} if spec.get("type") == space.get(key, {}).get("type") else dict(spec)
    for key, spec in space.items():
        _check_param(key, spec)
    if not space:
        raise SweepError("optimize.sweep.space: the search space is empty")
    return space


def _check_param(key: str, spec: dict) -> None:
    where = f"optimize.sweep.space.{key}"
    kind = spec.get("type")
    if kind == "categorical":
        if not spec.get("choices"):
            raise SweepError(f"{where}: a categorical parameter needs a non-empty `choices` list")
        return
    if kind not in ("float", "int"):
        raise SweepError(f"{where}.type: expected float, int or categorical, got {kind!r}")
    for bound in ("low", "high"):
        if not isinstance(spec.get(bound), (int, float)):
            raise SweepError(f"{where}.{bound}: a {kind} parameter needs a number")
    if spec["low"] >= spec["high"]:
        raise SweepError(f"{where}: low {spec['low']} must be below high {spec['high']}")
    if spec.get("log") and spec["low"] <= 0:
        raise SweepError(f"{where}: a log-scaled parameter needs low > 0, got {spec['low']}")
    if spec.get("log") and spec.get("step"):
        raise SweepError(f"{where}: `step` and `log` cannot be combined (Optuna)")
