"""Seeding: one call makes a run repeatable on a given device."""
from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_generator(seed: int, epoch: int):
    """A generator for the epoch's shuffle, derived from (seed, epoch).

    Deriving it instead of carrying one generator through training makes a resumed run
    shuffle exactly like an uninterrupted one without saving generator state."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return g
