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


def grid(space: dict, points: int) -> dict:
    """Grid values per parameter: the choices of a categorical, `points` values spanning a numeric range
    (evenly in log space for a log parameter)."""
    import numpy as np

    out = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            out[key] = list(spec["choices"])
            continue
        low, high = float(spec["low"]), float(spec["high"])
        values = np.geomspace(low, high, points) if spec.get("log") else np.linspace(low, high, points)
        step = spec.get("step") or (1 if spec["type"] == "int" else None)
        if step:  # a grid point off the parameter's step would be rejected by suggest_*
            values = [min(high, low + round((v - low) / step) * step) for v in values]
        cast = int if spec["type"] == "int" else float
        out[key] = sorted({cast(v) for v in values})
    return out


def grid_size(space: dict, points: int) -> int:
    """How many distinct points the grid sampler can try: the product of the values per parameter."""
    import math

    return math.prod(len(v) for v in grid(space, points).values())
