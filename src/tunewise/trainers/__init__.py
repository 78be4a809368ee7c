"""Trainer registry: built-in names, or `module:Class` for a trainer outside this repository.

A built-in trainer comes in two halves: its spec (name, metric, knobs, default config, checks, search space),
which imports no torch, and the trainer, which adds the training. Config validation and the light jobs ask
for the spec (`get_spec`), so that the Snakefile parse and those jobs never import torch; the jobs that train,
prepare data or evaluate ask for the trainer (`get_trainer`). A trainer of the user's own is both.
"""
from __future__ import annotations

import importlib
import os
import sys

BUILTIN = {
    "latent": "tunewise.trainers.latent.trainer:LatentTrainer",
    "textcaps": "tunewise.trainers.textcaps.trainer:TextCapsTrainer",
    "pez": "tunewise.trainers.pez.trainer:PezTrainer",
}
SPECS = {
    "latent": "tunewise.trainers.latent.spec:LatentSpec",
    "textcaps": "tunewise.trainers.textcaps.spec:TextCapsSpec",
    "pez": "tunewise.trainers.pez.spec:PezSpec",
}


def get_trainer(name: str):
    """The trainer that trains (imports torch for a built-in one)."""
    return _load(name, BUILTIN.get(name))


def get_spec(name: str):
    """What validation and the light jobs need of a trainer: its settings, knobs and search space, no torch."""
    return _load(name, SPECS.get(name))


def _load(name: str, target: str | None):
    if target is None:
        if ":" not in name:
            raise KeyError(
                f"unknown trainer {name!r}: expected one of {', '.join(sorted(BUILTIN))} or module:Class"
            )
        target = name
    module_name, _, class_name = target.partition(":")
    if name not in BUILTIN and os.getcwd() not in sys.path:
        # a trainer of the user's own (`examples.my_trainer:MyTrainer`) is found from where the workflow runs,
        # as `python -m` finds modules: the `tunewise` console script does not put the working directory on
        # sys.path, the Snakefile parse does, and both must import the same module
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"trainer {name!r}: cannot import module {module_name!r} ({e})") from None
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise AttributeError(f"trainer {name!r}: module {module_name!r} has no {class_name!r}") from None
    return cls()


def budget_key(trainer) -> str:
    """The dotted config key of a trainer's training budget (its `epochs` knob: train.epochs, or pez.iter for
    PEZ), in the unit its history steps count."""
    key = getattr(trainer, "knobs", {}).get("epochs", "train.epochs")
    return key if isinstance(key, str) else key[0]


def budget(trainer, config: dict) -> int:
    from tunewise.config import get_dotted

    return int(get_dotted(config, budget_key(trainer)))
