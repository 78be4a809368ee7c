"""Optimizer factory (with per-group learning rates) and the LR schedule.

`optim.param_groups` maps a parameter-name prefix to overrides, e.g.
`{"encoder": {"lr": 1e-4}}` gives the encoder its own learning rate (seed 001's
differential learning rates); everything unmatched forms the default group.
"""
from __future__ import annotations

import math

import torch

from tunewise.train.options import OPTIMIZERS, SCHEDULES  # noqa: F401  (re-exported)


def param_groups(model: torch.nn.Module, optim_cfg: dict) -> list[dict]:
    overrides: dict = optim_cfg.get("param_groups") or {}
    buckets: dict[str, list] = {prefix: [] for prefix in overrides}
    default: list = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((pre for pre in overrides if name == pre or name.startswith(pre + ".")), None)
        (buckets[prefix] if prefix is not None else default).append(p)
    groups = [{"params": default, "name": "default"}] if default else []
    for prefix, params in buckets.items():
        if not params:
            raise ValueError(f"optim.param_groups.{prefix}: matches no parameter of the model")
        groups.append({"params": params, "name": prefix, **overrides[prefix]})
    return groups


def build_optimizer(model: torch.nn.Module, optim_cfg: dict) -> torch.optim.Optimizer:
    name = optim_cfg.get("name", "adam")
    groups = param_groups(model, optim_cfg)
    lr = float(optim_cfg["lr"])
    wd = float(optim_cfg.get("weight_decay") or 0.0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=float(optim_cfg.get("momentum", 0.9)))
    raise ValueError(f"optim.name: unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")


class Schedule:
    """Per-step warm-up and decay, or per-epoch reduce-on-plateau, behind one interface.

    Multipliers are applied to each group's own base LR, so differential learning rates
    keep their ratio through warm-up and decay."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict, epochs: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.name = cfg.get("name", "none")
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name: unknown schedule {self.name!r} (expected one of {', '.join(SCHEDULES)})")
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(1, epochs * self.steps_per_epoch)
        self.warmup = int(round(float(cfg.get("warmup_epochs") or 0) * self.steps_per_epoch))
        self.end_factor = float(cfg.get("lr_end_factor", 0.01))
        self.step_size = int(cfg.get("step_size", 10))
        self.gamma = float(cfg.get("gamma", 0.1))
        self.patience = int(cfg.get("patience", 3))
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.plateau_factor = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0
        self._apply()

    def factor(self) -> float:
        s = self.step_count
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = (s - self.warmup) / max(1, self.total - self.warmup)
        if self.name == "linear":
            return 1.0 + (self.end_factor - 1.0) * min(1.0, progress)
        if self.name == "cosine":
            return self.end_factor + (1 - self.end_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if self.name == "step":
            return self.gamma ** ((s // self.steps_per_epoch) // self.step_size)
        if self.name == "plateau":
            return self.plateau_factor
        return 1.0

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step_batch(self) -> None:
        self.step_count += 1
        if self.name != "none" or self.step_count <= self.warmup:
            self._apply()

    def step_epoch(self, value: float, higher_is_better: bool) -> None:
        if self.name != "plateau":
            return
        score = value if higher_is_better else -value
        if self.plateau_best is None or score > self.plateau_best + 1e-12:
            self.plateau_best, self.plateau_bad = score, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.patience:
                self.plateau_factor *= self.gamma
                self.plateau_bad = 0
        self._apply()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "plateau_factor": self.plateau_factor,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]
        self._apply()
