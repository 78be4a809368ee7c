"""The latent trainer's design settings: the `design:` block's defaults and checks.

Torch-free, so that validating a config (the Snakefile parse, `tunewise validate`) does not import torch;
the design itself is in design.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODES = ("max", "min", "target")
INITS = ("top_k", "random", "random_latent", "input")
DESIGN_OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")  # design.optimizer: the torch classes are in design.py

# the `design:` block of a latent experiment (merged over by the user's; every key in config/README.md)
DEFAULT_DESIGN: dict[str, Any] = {
    "enabled": True,
    # what to design: tasks are target columns; `target` (target mode) and constraint bounds are physical units
    "objectives": [{"task": "PF_p", "mode": "max", "weight": 1.0, "target": None}],
    "constraints": [],  # e.g. {task: kappa_p, max: 1.0e5}
    "constraint_weight": 10.0,
    # where the restarts start: encoded top-k known compounds by the objective, encoded random descriptors, or a file
    "init": "top_k",
    "initial_input": None,
    "restarts": 64,
    "steps": 300,
    "lr": 0.05,
    "optimizer": "adam",
    "plateau": {"factor": 0.5, "patience": 20, "min_lr": 1.0e-4},
    "patience": 60,
    "min_delta": 1.0e-4,
    "l2": 0.001,
    "trust_radius": None,
    "bounds": "data",  # null, "data" (the training latents' range per dimension), or [low, high]
    "alpha": 0.5,
    "roundtrip_tol": 0.25,
    "near_ratio": 3.0,  # a design within this many typical nearest-neighbour distances of a known compound is "near"
    "neighbors": 3,
    "top": 5,
    "seed": 0,
    "alpha_study": [0.0, 0.1, 0.25, 0.5, 1.0],  # the design rule repeats the design at each alpha (off-manifold rate); [] = off
}


def resolve_design_config(design_cfg: dict | None) -> dict:
    """The design block over DEFAULT_DESIGN (`plateau` merged key by key)."""
    from tunewise.config import deep_merge

    return deep_merge(DEFAULT_DESIGN, design_cfg or {})


def check_design_config(cfg: dict, targets: Sequence[str]) -> None:
    """Clear errors for a design block that cannot run (checked when the config is validated)."""
    where = "design"
    if not cfg["objectives"]:
        raise ValueError(f"{where}.objectives: at least one objective is required")
    for i, o in enumerate(cfg["objectives"]):
        if not isinstance(o, dict) or "task" not in o:
            raise ValueError(f"{where}.objectives[{i}]: expected a mapping with a task, got {o!r}")
        unknown = set(o) - {"task", "mode", "weight", "target"}
        if unknown:
            raise ValueError(f"{where}.objectives[{i}]: unknown key(s) {sorted(unknown)} (task, mode, weight, target)")
        if o["task"] not in targets:
            default = cfg["objectives"] == DEFAULT_DESIGN["objectives"]
            hint = (f" (it is the default objective: set design.objectives, e.g. [{{task: {targets[0]}, mode: max}}], "
                    "or design: {enabled: false})") if default and targets else ""
            raise ValueError(f"{where}.objectives[{i}].task: {o['task']!r} is not a target column ({', '.join(targets)})"
                             f"{hint}")
        mode = o.get("mode", "max")
        if mode not in MODES:
            raise ValueError(f"{where}.objectives[{i}].mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if mode == "target" and not isinstance(o.get("target"), (int, float)):
            raise ValueError(f"{where}.objectives[{i}]: mode target needs a numeric target (physical units)")
        if not isinstance(o.get("weight", 1.0), (int, float)):
            raise ValueError(f"{where}.objectives[{i}].weight: expected a number, got {o.get('weight')!r}")
    for i, c in enumerate(cfg["constraints"] or []):
        if not isinstance(c, dict) or c.get("task") not in targets:
            raise ValueError(f"{where}.constraints[{i}]: expected {{task, max and/or min}} with task in {list(targets)}, got {c!r}")
        unknown = set(c) - {"task", "max", "min"}
        if unknown or (c.get("max") is None and c.get("min") is None):
            raise ValueError(f"{where}.constraints[{i}]: give max and/or min (physical units), got {c!r}")
        if c.get("min") is not None and c.get("max") is not None and c["min"] > c["max"]:
            raise ValueError(f"{where}.constraints[{i}]: min {c['min']} is above max {c['max']}: no design can meet it")
    _check_feasible(cfg, where)
    if cfg["init"] not in INITS:
        raise ValueError(f"{where}.init: expected one of {', '.join(INITS)}, got {cfg['init']!r}")
    if cfg["init"] == "input" and not cfg["initial_input"]:
        raise ValueError(f"{where}.init: 'input' needs design.initial_input (a CSV or parquet of descriptors)")
    if cfg["optimizer"] not in DESIGN_OPTIMIZERS:
        raise ValueError(f"{where}.optimizer: expected one of {', '.join(DESIGN_OPTIMIZERS)}, got {cfg['optimizer']!r}")
    for key in ("restarts", "steps"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{where}.{key}: must be >= 1, got {cfg[key]}")
    for key in ("lr", "roundtrip_tol"):
        if float(cfg[key]) <= 0:
            raise ValueError(f"{where}.{key}: must be > 0, got {cfg[key]}")
    for key in ("l2", "alpha", "constraint_weight"):
        if float(cfg[key]) < 0:
            raise ValueError(f"{where}.{key}: must be >= 0, got {cfg[key]}")
    bounds = cfg["bounds"]
    if not (bounds is None or bounds == "data" or (isinstance(bounds, list) and len(bounds) == 2 and bounds[0] < bounds[1])):
        raise ValueError(f"{where}.bounds: expected null, 'data' or [low, high] with low < high, got {bounds!r}")
    if cfg["trust_radius"] is not None and float(cfg["trust_radius"]) <= 0:
        raise ValueError(f"{where}.trust_radius: must be > 0 or null, got {cfg['trust_radius']}")
    if any(float(a) < 0 for a in cfg["alpha_study"] or []):
        raise ValueError(f"{where}.alpha_study: alphas must be >= 0, got {cfg['alpha_study']}")


def _check_feasible(cfg: dict, where: str) -> None:
    """Objectives that no design can meet together with the constraints: a target value outside a constraint on
    the same task, or a task both maximised and minimised."""
    bounds: dict = {}
    for c in cfg["constraints"] or []:
        low, high = bounds.get(c["task"], (float("-inf"), float("inf")))
        bounds[c["task"]] = (max(low, c["min"]) if c.get("min") is not None else low,
                             min(high, c["max"]) if c.get("max") is not None else high)
    for task, (low, high) in bounds.items():
        if low > high:
            raise ValueError(f"{where}.constraints: the constraints on {task} leave nothing between min {low} and max {high}")
    modes: dict = {}
    for i, o in enumerate(cfg["objectives"]):
        mode = o.get("mode", "max")
        modes.setdefault(o["task"], set()).add(mode)
        if mode == "target" and o["task"] in bounds:
            low, high = bounds[o["task"]]
            if not low <= o["target"] <= high:
                raise ValueError(f"{where}.objectives[{i}].target: {o['target']} lies outside the constraints on "
                                 f"{o['task']} (min {low}, max {high}): no design can meet both")
    for task, seen in modes.items():
        if {"max", "min"} <= seen:
            raise ValueError(f"{where}.objectives: {task} is both maximised and minimised; keep one objective per task")

