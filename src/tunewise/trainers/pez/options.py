"""PEZ's options (the config's `pez:` section), torch-free: validating a config checks them without torch."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class PezConfig:
    iter: int = 3000
    lr: float = 0.1
    weight_decay: float = 0.1
    prompt_len: int = 16
    prompt_bs: int = 1
    batch_size: int | None = None  # targets per step; None = all
    loss_weight: float = 1.0  # < 0 searches for the least similar prompt
    eval_every: int = 1
    blocklist: list = field(default_factory=list)
    exclude_special: bool = True
    exclude_non_ascii: bool = False
    only_ids: list | None = None
    fast_projection: bool | None = None  # bf16 shortlist + exact check; None = where it times faster
    patience: int | None = None  # evaluations without improvement before stopping; None = never
    # an evaluation improves (for patience) only when its similarity beats the best at the last improvement by
    # more than this: 0 counts any gain, as before the key existed
    min_delta: float = 0.0
    restarts: int = 1
    seed: int = 0
    amp: Any = "auto"  # bf16 autocast on CUDA; ignored on the CPU

    @classmethod
    def of(cls, cfg: "PezConfig | dict | None") -> "PezConfig":
        if isinstance(cfg, cls):
            return cfg
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown PEZ option(s) {unknown}; known: {sorted(known)}")
        out = cls(**cfg)
        for key in ("iter", "prompt_len", "prompt_bs", "eval_every", "restarts"):
            if int(getattr(out, key)) < 1:
                raise ValueError(f"PEZ option {key} must be >= 1, got {getattr(out, key)}")
        if out.batch_size is not None and out.batch_size < 1:
            raise ValueError(f"PEZ option batch_size must be >= 1 or null, got {out.batch_size}")
        delta = out.min_delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < float("inf"):
            raise ValueError(f"PEZ option min_delta must be a number >= 0, got {delta!r}")
        if out.loss_weight == 0:
            raise ValueError("PEZ option loss_weight must not be 0")
        return out
