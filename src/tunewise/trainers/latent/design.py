"""Inverse design in the latent space of a trained `LatentModel` (seed 003).

The weights are frozen; the latent vector is what is optimised. Every restart is a row of one
`[restarts, latent_dim]` tensor: one forward and one backward per step serve all of them, and a
restart that has stopped (early stopping) is masked (its learning rate is 0), not looped over.

Per row, the loss minimised is

    -score(heads(z))                                   objectives (max / min / target), weighted
    + constraint_weight * sum relu(violation)           property bounds, a hinge
    + l2 * |(z - mu) / sd|^2                            prior: the training latents' diagonal Gaussian
    + alpha * |(z - E(D(z))) / sd|^2                    autoencoder alignment (methods.md)

Squared norms, as in seed 003's `0.01 * (latent ** 2).sum()`, measured in the training latents'
standard deviations so that the weights do not depend on the latent's scale. With this scaling the
latent model of the default config reproduces the public finding methods.md quotes: alpha 0 drifts
off the manifold, 0.5 works, 1 over-constrains (bench `design`, the design report's alpha study).

with an optional trust radius around the start and box bounds (projections after each step).
Everything here works in the model's units (standardised, log10 where configured); `design`
converts the user's physical values in and out with the data's Scaler.

A design is checked by the round trip: the properties predicted from E(D(z*)), the latent of its
own decoded descriptor, against those predicted from z*. A design whose round trip disagrees by
more than `roundtrip_tol` (standard deviations of the property) is off-manifold: the decoded
descriptor does not carry the properties z* promised, and it is not reported as a success.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tunewise.runs import finite_float
from tunewise.trainers.latent.design_settings import (  # noqa: F401  (re-exported: design.py was their home)
    DEFAULT_DESIGN,
    DESIGN_OPTIMIZERS,
    INITS,
    MODES,
    check_design_config,
    resolve_design_config,
)

_TORCH_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}
OPTIMIZERS = {name: getattr(torch.optim, _TORCH_NAMES[name]) for name in DESIGN_OPTIMIZERS}


# --- the batched optimiser ------------------------------------------------------------------


@dataclass
class Objective:
    """One term of the score, in model units: `max`/`min` -> +-weight * pred, `target` -> -weight * (pred - target)^2."""

    task: int
    mode: str = "max"
    weight: float = 1.0
    target: float | None = None


@dataclass
class Constraint:
    """pred[task] <= upper and/or >= lower, in model units."""

    task: int
    upper: float | None = None
    lower: float | None = None


@dataclass
class LatentResult:
    z: torch.Tensor  # [R, d] the best latent of each restart (lowest loss seen)
    z0: torch.Tensor  # [R, d] the start
    loss: torch.Tensor  # [R] its loss
    score: torch.Tensor  # [R] its objective score (no penalties)
    steps: torch.Tensor  # [R] steps run before the restart stopped
    lr: torch.Tensor  # [R] learning rate at the end (after plateau reductions)
    trajectory: torch.Tensor  # [steps, R] the score at each step; NaN once a restart has stopped
    seconds: float = 0.0


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no weight gradients for the duration; both restored afterwards, parameter by parameter."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


class _Terms:
    """The per-row score and penalties, shared by the batched optimiser and the round-trip check."""

    def __init__(self, model, objectives: Sequence[Objective], constraints: Sequence[Constraint], *, mu, sd,
                 l2: float, alpha: float | torch.Tensor, constraint_weight: float, device):
        if not objectives:
            raise ValueError("design: at least one objective is required")
        n_tasks = model.n_tasks
        for o in objectives:
            if o.mode not in MODES:
                raise ValueError(f"design objective: mode must be one of {', '.join(MODES)}, got {o.mode!r}")
            if o.mode == "target" and (o.target is None or not math.isfinite(o.target)):
                raise ValueError("design objective: mode 'target' needs a finite target value")
            if not 0 <= o.task < n_tasks:
                raise ValueError(f"design objective: task index {o.task} not in 0..{n_tasks - 1}")
        for c in constraints:
            if c.upper is None and c.lower is None:
                raise ValueError(f"design constraint on task {c.task}: give an upper and/or a lower bound")
            if not 0 <= c.task < n_tasks:
                raise ValueError(f"design constraint: task index {c.task} not in 0..{n_tasks - 1}")
        self.model = model
        f32 = dict(dtype=torch.float32, device=device)
        # the design step evaluates only the heads it needs (objective and constraint tasks)
        needed = sorted({o.task for o in objectives} | {c.task for c in constraints})
        heads = getattr(model, "heads", None)
        if heads is not None and len(needed) == 1:
            self._predict_needed = heads[needed[0]]
        elif heads is not None:
            self._predict_needed = lambda z: torch.cat([heads[t](z) for t in needed], dim=1)
        else:
            self._predict_needed = lambda z: model.predict(z)[:, needed]
        position = {t: i for i, t in enumerate(needed)}
        self.obj_idx = torch.tensor([o.task for o in objectives], device=device)
        self.obj_pos = torch.tensor([position[o.task] for o in objectives], device=device)
        self.obj_w = torch.tensor([float(o.weight) for o in objectives], **f32)
        self.obj_sign = torch.tensor([-1.0 if o.mode == "min" else 1.0 for o in objectives], **f32)
        self.obj_target = torch.tensor([float(o.target) if o.mode == "target" else 0.0 for o in objectives], **f32)
        self.obj_is_target = torch.tensor([o.mode == "target" for o in objectives], device=device)
        inf = float("inf")
        self.con_idx = torch.tensor([c.task for c in constraints], dtype=torch.long, device=device)
        self.con_pos = torch.tensor([position[c.task] for c in constraints], dtype=torch.long, device=device)
        self.con_hi = torch.tensor([inf if c.upper is None else float(c.upper) for c in constraints], **f32)
        self.con_lo = torch.tensor([-inf if c.lower is None else float(c.lower) for c in constraints], **f32)
        self.any_target = any(o.mode == "target" for o in objectives)
        self.plain_max = len(objectives) == 1 and objectives[0].mode == "max" and float(objectives[0].weight) == 1.0
        self.mu = mu.to(**f32)
        self.inv_sd = 1.0 / sd.to(**f32)
        self.inv_var = self.inv_sd**2  # |(z - m) / sd|^2 = (z - m)^2 @ inv_var: one mat-vec
        self.l2, self.cw = float(l2), float(constraint_weight)
        self.alpha = alpha.to(**f32) if torch.is_tensor(alpha) else float(alpha)

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        if self.plain_max:  # the common case, in the fewest ops: it runs every design step
            return p[:, 0]
        per = self.obj_sign * p
        if self.any_target:
            per = torch.where(self.obj_is_target, -(p - self.obj_target) ** 2, per)
        return per @ self.obj_w

    def _violation(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[1] == 0:
            return p.new_zeros(p.shape[0])
        return (torch.relu(p - self.con_hi) + torch.relu(self.con_lo - p)).sum(dim=1)

    def score(self, preds: torch.Tensor) -> torch.Tensor:
        """[R] objective score of full predictions [R, n_tasks]."""
        return self._score(preds[:, self.obj_idx])

    def violation(self, preds: torch.Tensor) -> torch.Tensor:
        """[R] summed hinge violation of the constraints (0 when all hold), from full predictions."""
        return self._violation(preds[:, self.con_idx])

    def loss(self, z: torch.Tensor, need_alignment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [R], score [R]) at z."""
        p = self._predict_needed(z)
        score = self._score(p[:, self.obj_pos])
        loss = -score
        if self.cw and self.con_pos.numel():
            loss = loss + self.cw * self._violation(p[:, self.con_pos])
        if self.l2:
            loss = loss + self.l2 * (torch.square(z - self.mu) @ self.inv_var)
        if need_alignment:
            z_rt = self.model.encode(self.model.decode(z))
            loss = loss + self.alpha * (torch.square(z - z_rt) @ self.inv_var)
        return loss, score


def optimize_latent(
    model,
    z0: torch.Tensor,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint] = (),
    *,
    steps: int = 500,
    lr: float = 0.05,
    optimizer: str = "adam",
    plateau_factor: float = 0.5,
    plateau_patience: int | None = 20,
    min_lr: float = 1e-4,
    patience: int | None = 50,
    min_delta: float = 1e-4,
    l2: float = 0.0,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    trust_radius: float | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float | torch.Tensor = 0.0,
    constraint_weight: float = 10.0,
    progress: bool = False,
) -> LatentResult:
    """Optimise R latents at once, starting from z0 [R, d]; the model is frozen and left as it was.

    Each row is its own restart: its own optimiser state (Adam's state is elementwise), its own
    reduce-on-plateau learning rate and its own early stopping; a stopped row gets lr 0 and stays put.
    Adam (the default) is `_RowAdam`: torch's Adam update with a learning rate per row. The other
    optimisers are torch's, run with lr 1 and each row's step scaled by its learning rate afterwards:
    their updates are linear in lr, so this too is exactly R optimisers.
    Plateau and early stopping follow torch's ReduceLROnPlateau (mode min, threshold_mode abs =
    min_delta) and seed 003's loop: a step improves when the loss falls by more than min_delta.
    `alpha` may be a scalar or a [R] tensor (one alignment weight per restart).
    """
    import time

    from tqdm.auto import tqdm

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"design.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if steps < 1 or lr <= 0:
        raise ValueError(f"design: need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if z0.dim() != 2 or z0.shape[1] != model.latent_dim:
        raise ValueError(f"design: z0 must be [restarts, {model.latent_dim}], got {tuple(z0.shape)}")
    started = time.perf_counter()
    device = z0.device
    n, d = z0.shape
    mu, sd = prior if prior is not None else (torch.zeros(d), torch.ones(d))
    terms = _Terms(model, objectives, constraints, mu=mu, sd=sd, l2=l2, alpha=alpha,
                   constraint_weight=constraint_weight, device=device)
    need_alignment = bool(torch.any(torch.as_tensor(alpha) != 0))
    if bounds is not None:
        lo, hi = (b.to(device=device, dtype=torch.float32) for b in bounds)
    z_start = z0.detach().float().clone()
    with frozen(model):
        # the working batch: rows still running, `rows` their indices in the full batch. Every 10 steps, once a
        # quarter of them have stopped, it is compacted to the running rows (Adam's state is sliced with them):
        # still one batch, no longer paying for restarts that are done.
        rows = torch.arange(n, device=device)
        z = z_start.clone().requires_grad_(True)
        z_first = z_start
        row_adam = _RowAdam(z) if optimizer == "adam" else None
        opt = None if row_adam else OPTIMIZERS[optimizer]([z], lr=1.0)
        alpha_full = terms.alpha
        lr_row = torch.full((n,), float(lr), device=device)
        best = torch.full((n,), float("inf"), device=device)
        z_best = z_start.clone()
        bad_stop = torch.zeros(n, dtype=torch.long, device=device)
        bad_plateau = torch.zeros(n, dtype=torch.long, device=device)
        active = torch.ones(n, dtype=torch.bool, device=device)
        steps_run = torch.zeros(n, dtype=torch.long, device=device)
        out_z, out_best, out_steps, out_lr = z_best.clone(), best.clone(), steps_run.clone(), lr_row.clone()
        trajectory = torch.full((steps, n), float("nan"), device=device)
        last_step = steps - 1

        def write_back():
            out_z[rows], out_best[rows], out_steps[rows], out_lr[rows] = z_best, best, steps_run, lr_row

        bar = tqdm(range(steps), desc="design", unit="step", disable=not progress, leave=False)
        for t in bar:
            loss, score = terms.loss(z, need_alignment)
            # rows are independent: the sum's gradient in row r is row r's own
            (grad,) = torch.autograd.grad(loss.sum(), z)
            with torch.no_grad():
                trajectory[t].index_copy_(0, rows, score)  # a stopped row's entries are masked at the end
                improved = (loss < best - min_delta) & active
                best = torch.where(improved, loss, best)
                z_best = torch.where(improved[:, None], z, z_best)
                bad_stop.add_(1).masked_fill_(improved, 0)
                bad_plateau.add_(1).masked_fill_(improved, 0)
                steps_run.add_(active)
                step_lr = lr_row * active
                if row_adam is not None:
                    row_adam.step(grad, step_lr)
                else:
                    previous = z.detach().clone()
                    z.grad = grad
                    opt.step()
                    z.copy_(torch.addcmul(previous, step_lr[:, None], z - previous))
                if trust_radius is not None:
                    delta = z - z_first
                    norm = delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    z.copy_(z_first + delta * torch.clamp(float(trust_radius) / norm, max=1.0))
                if bounds is not None:
                    torch.maximum(torch.minimum(z, hi), lo, out=z)
                # ReduceLROnPlateau: more than `patience` steps without improvement -> lr * factor
                if plateau_patience is not None:
                    reduce = (bad_plateau > plateau_patience) & active
                    lr_row = torch.where(reduce, torch.clamp(lr_row * plateau_factor, min=min_lr), lr_row)
                    bad_plateau.masked_fill_(reduce, 0)
                if patience is not None:
                    active &= bad_stop < patience
            if patience is None or t % 10 != 9:
                continue
            n_active = int(active.sum())
            if n_active == 0:
                last_step = t
                break
            if row_adam is not None and n_active <= 0.75 * len(rows):
                write_back()
                keep = torch.nonzero(active).flatten()
                rows = rows[keep]
                z = z.detach()[keep].requires_grad_(True)
                row_adam = row_adam.select(z, keep)
                z_first, z_best, best, lr_row = z_first[keep], z_best[keep], best[keep], lr_row[keep]
                bad_stop, bad_plateau, steps_run, active = bad_stop[keep], bad_plateau[keep], steps_run[keep], active[keep]
                if torch.is_tensor(alpha_full):
                    terms.alpha = alpha_full[rows]
        bar.close()
        write_back()
        trajectory = trajectory[: last_step + 1]
        # row r ran steps 0 .. steps_run[r] - 1; after that it was masked
        ran = torch.arange(len(trajectory), device=device)[:, None] < out_steps[None, :]
        trajectory = trajectory.masked_fill(~ran, float("nan"))
        terms.alpha = alpha_full
        z_best, steps_run, lr_row = out_z, out_steps, out_lr
        with torch.no_grad():
            loss_best, score_best = terms.loss(z_best, need_alignment)
    return LatentResult(
        z=z_best.detach(), z0=z_start, loss=loss_best.detach(), score=score_best.detach(), steps=steps_run,
        lr=lr_row, trajectory=trajectory.detach(), seconds=time.perf_counter() - started,
    )


class _RowAdam:
    """torch.optim.Adam's update (default betas and eps, no weight decay) for a [R, d] tensor with one learning
    rate per row. Written out because torch's optimisers take one learning rate per parameter group, and
    because for one small tensor its step is a few fused in-place ops instead of the optimiser's machinery."""

    def __init__(self, param: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.beta1, self.beta2, self.eps = param, betas[0], betas[1], eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.t = 0

    def select(self, param: torch.Tensor, keep: torch.Tensor) -> _RowAdam:
        """The same optimiser for the rows `keep` of the batch, now the rows of `param`."""
        other = _RowAdam(param, (self.beta1, self.beta2), self.eps)
        other.exp_avg, other.exp_avg_sq, other.t = self.exp_avg[keep], self.exp_avg_sq[keep], self.t
        return other

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: torch.Tensor) -> None:
        self.t += 1
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1, bias2 = 1 - self.beta1**self.t, math.sqrt(1 - self.beta2**self.t)
        # lr/b1 * m / (sqrt(v)/b2 + eps) = (lr * b2/b1) * m / (sqrt(v) + eps * b2): torch's update, fewer ops
        denom = self.exp_avg_sq.sqrt().add_(self.eps * bias2)
        self.param.addcdiv_(self.exp_avg * (lr * (-bias2 / bias1)).unsqueeze(1), denom)


@torch.no_grad()
def round_trip(model, z: torch.Tensor, tasks: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """Decode z, encode the descriptor again and predict from both latents.

    Returns preds [R, T] (from z), preds_rt [R, T] (from E(D(z))), x [R, n_in] (the decoded,
    standardised descriptor), z_rt and disagreement [R]: the largest |preds_rt - preds| over `tasks`.
    """
    with frozen(model):
        x = model.decode(z)
        z_rt = model.encode(x)
        preds, preds_rt = model.predict(z), model.predict(z_rt)
    idx = torch.as_tensor(list(tasks) if not torch.is_tensor(tasks) else tasks, dtype=torch.long, device=z.device)
    disagreement = (preds_rt[:, idx] - preds[:, idx]).abs().amax(dim=1)
    return {"preds": preds, "preds_rt": preds_rt, "x": x, "z_rt": z_rt, "disagreement": disagreement}


# --- design with a trained model and its data: physical units in and out -----------------------


def _standardise_value(scaler, task: int, value: float) -> float:
    row = np.full((1, len(scaler.target_columns)), np.nan)
    row[0, task] = value
    out = float(scaler.transform_y(row)[0, task])
    if not math.isfinite(out):
        raise ValueError(
            f"design: {value} is not a valid value of {scaler.target_columns[task]} (log10 of a value <= 0?)"
        )
    return out


def objectives_from_config(cfg: dict, scaler) -> tuple[list[Objective], list[Constraint]]:
    """Physical-unit objectives and constraints of a design block -> model units."""
    targets = list(scaler.target_columns)
    objectives = []
    for o in cfg["objectives"]:
        t = targets.index(o["task"])
        mode = o.get("mode", "max")
        target = _standardise_value(scaler, t, float(o["target"])) if mode == "target" else None
        objectives.append(Objective(task=t, mode=mode, weight=float(o.get("weight", 1.0)), target=target))
    constraints = []
    for c in cfg["constraints"] or []:
        t = targets.index(c["task"])
        upper = _standardise_value(scaler, t, float(c["max"])) if c.get("max") is not None else None
        lower = _standardise_value(scaler, t, float(c["min"])) if c.get("min") is not None else None
        constraints.append(Constraint(task=t, upper=upper, lower=lower))
    return objectives, constraints


@dataclass
class DesignData:
    """What a design needs from the data: the known compounds (standardised), their latents, the scaler."""

    x: torch.Tensor  # [N, n_in] every known compound, standardised
    y: torch.Tensor  # [N, T] standardised targets, NaN = missing
    ids: list[str]
    formulas: list[str]
    split: list[str]  # train/val/test per row
    scaler: Any
    descriptor_columns: list[str]
    z_train: torch.Tensor  # latents of the training compounds
    typical_nn: float  # median distance of a validation compound to its nearest training compound
    extra: dict = field(default_factory=dict)

    @property
    def train_mask(self) -> torch.Tensor:
        return torch.tensor([s == "train" for s in self.split])


@torch.no_grad()
def _nearest(query: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest Euclidean distances from each query row to the pool, in chunks of the pool."""
    best_d = torch.full((query.shape[0], 0), float("inf"), device=query.device)
    best_i = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
    for start in range(0, pool.shape[0], chunk):
        d = torch.cdist(query, pool[start : start + chunk])
        d_all = torch.cat([best_d, d], dim=1)
        i_all = torch.cat([best_i, torch.arange(start, start + d.shape[1], device=query.device).expand_as(d)], dim=1)
        best_d, pos = torch.topk(d_all, min(k, d_all.shape[1]), dim=1, largest=False)
        best_i = torch.gather(i_all, 1, pos)
    return best_d, best_i


def design_data(model, splits, device, typical_nn: float | None = None) -> DesignData:
    """Known compounds of every split, the training latents (prior, bounds) and the typical nearest-neighbour
    distance that puts a design's distance to the known compounds in scale (descriptor space: it does not
    depend on the model, so a caller designing every epoch passes the first one back)."""
    x = torch.cat([splits.x[s] for s in ("train", "val", "test")]).to(device)
    y = torch.cat([splits.y[s] for s in ("train", "val", "test")]).to(device)
    split = [s for s in ("train", "val", "test") for _ in range(len(splits.ids[s]))]
    with frozen(model), torch.no_grad():
        z_train = torch.cat([model.encode(b) for b in splits.x["train"].to(device).split(8192)])
    x_train, x_val = splits.x["train"].to(device), splits.x["val"].to(device)
    typical = float("nan") if typical_nn is None else float(typical_nn)
    if typical_nn is None and len(x_val):
        d, _ = _nearest(x_val[:2000], x_train, 1)
        typical = float(d[:, 0].median())
    return DesignData(
        x=x, y=y, ids=[i for s in ("train", "val", "test") for i in splits.ids[s]],
        formulas=[f for s in ("train", "val", "test") for f in splits.formulas[s]], split=split,
        scaler=splits.scaler, descriptor_columns=list(splits.descriptor_columns), z_train=z_train, typical_nn=typical,
    )


def initial_latents(model, cfg: dict, data: DesignData, terms_score, device) -> tuple[torch.Tensor, list[dict]]:
    """z0 [R, d] and, per restart, where it started (a known compound, random, or a row of the input file)."""
    n = int(cfg["restarts"])
    if cfg["init"] == "top_k":
        # the training compounds with the best objective score from their measured values
        train = data.train_mask.to(device)
        y = data.y[train]
        score = terms_score(torch.nan_to_num(y, nan=0.0))
        observed = ~torch.isnan(y[:, [o for o in cfg["_objective_tasks"]]]).any(dim=1)
        score = torch.where(observed, score, torch.tensor(float("-inf"), device=device))
        n = min(n, int(observed.sum()))
        if n == 0:
            raise ValueError("design.init top_k: no training compound has all objective properties observed")
        order = torch.topk(score, n).indices
        rows = torch.nonzero(train).flatten()[order]
        with torch.no_grad():
            z0 = model.encode(data.x[rows])
        starts = [{"kind": "known", "id": data.ids[r], "formula": data.formulas[r]} for r in rows.tolist()]
        return z0, starts
    if cfg["init"] == "random":
        # seed 003: random descriptors ~ N(0, 1) in standardised units, encoded
        g = torch.Generator().manual_seed(int(cfg["seed"]))
        x = torch.randn(n, model.n_in, generator=g).to(device)
        with torch.no_grad():
            z0 = model.encode(x)
        return z0, [{"kind": "random"} for _ in range(n)]
    if cfg["init"] == "random_latent":
        # latents drawn from the training latents' diagonal Gaussian (the prior of the l2 penalty)
        g = torch.Generator().manual_seed(int(cfg["seed"]))
        mu, sd = data.z_train.mean(dim=0), data.z_train.std(dim=0)
        z0 = (mu.cpu() + sd.cpu() * torch.randn(n, model.latent_dim, generator=g)).to(device)
        return z0, [{"kind": "random"} for _ in range(n)]
    path = cfg["initial_input"]
    import pandas as pd

    table = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    missing = [c for c in data.descriptor_columns if c not in table.columns]
    if missing:
        raise ValueError(f"design.initial_input {path}: missing descriptor column(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(data.descriptor_columns)})")
    values = table[data.descriptor_columns].to_numpy(dtype="float64")
    if not np.isfinite(values).all():
        raise ValueError(f"design.initial_input {path}: descriptors must be finite numbers")
    x = torch.as_tensor(data.scaler.transform_x(values), dtype=torch.float32, device=device)
    with torch.no_grad():
        z0 = model.encode(x)
    label = table["formula"].astype(str).tolist() if "formula" in table.columns else [None] * len(table)
    return z0, [{"kind": "input", "row": i, "formula": label[i]} for i in range(len(table))]


def run_design(model, cfg: dict, data: DesignData, device, alphas: Sequence[float] | None = None,
               progress: bool = False) -> list[dict]:
    """A whole design from a design block: optimise, check the round trip, find the nearest known compounds.

    `alphas` (default: the block's alpha) runs the same restarts once per alignment weight, all in one
    batch (alpha is a per-row weight). Returns one JSON-ready dict per alpha: alpha, summary, and one entry
    per restart (best first); what the files and report need goes in `_arrays` (latents, decoded
    descriptors, trajectories)."""
    scaler = data.scaler
    targets = list(scaler.target_columns)
    objectives, constraints = objectives_from_config(cfg, scaler)
    alphas = [float(cfg["alpha"])] if alphas is None else [float(a) for a in alphas]
    mu, sd = data.z_train.mean(dim=0), data.z_train.std(dim=0).clamp(min=1e-6)
    terms = _Terms(model, objectives, constraints, mu=mu, sd=sd, l2=float(cfg["l2"]), alpha=0.0,
                   constraint_weight=float(cfg["constraint_weight"]), device=device)
    cfg = {**cfg, "_objective_tasks": [o.task for o in objectives]}
    with frozen(model):
        z_start, starts = initial_latents(model, cfg, data, terms.score, device)
    n = len(starts)
    z0 = z_start.repeat(len(alphas), 1)
    alpha_rows = torch.tensor(alphas, device=device).repeat_interleave(n)
    bounds = None
    if cfg["bounds"] == "data":
        bounds = (data.z_train.amin(dim=0), data.z_train.amax(dim=0))
    elif isinstance(cfg["bounds"], list):
        d = model.latent_dim
        bounds = (torch.full((d,), float(cfg["bounds"][0])), torch.full((d,), float(cfg["bounds"][1])))
    plateau = cfg["plateau"] or {}
    result = optimize_latent(
        model, z0, objectives, constraints, steps=int(cfg["steps"]), lr=float(cfg["lr"]), optimizer=cfg["optimizer"],
        plateau_factor=float(plateau.get("factor", 0.5)), plateau_patience=plateau.get("patience"),
        min_lr=float(plateau.get("min_lr", 0.0)), patience=cfg["patience"], min_delta=float(cfg["min_delta"]),
        l2=float(cfg["l2"]), prior=(mu, sd), trust_radius=cfg["trust_radius"], bounds=bounds, alpha=alpha_rows,
        constraint_weight=float(cfg["constraint_weight"]), progress=progress,
    )
    checked = sorted({o.task for o in objectives} | {c.task for c in constraints})
    rt = round_trip(model, result.z, checked)
    with torch.no_grad():
        score_rt = terms.score(rt["preds_rt"])
        violation = terms.violation(rt["preds"])
        violation_rt = terms.violation(rt["preds_rt"])
        # the validated score: what the model says about the decoded descriptor, less any broken constraint
        validated = score_rt - float(cfg["constraint_weight"]) * violation_rt
        dist, nn_idx = _nearest(rt["x"], data.x, max(1, int(cfg["neighbors"])))
        train_dist, _ = _nearest(rt["x"], data.x[data.train_mask.to(data.x.device)], 1)
    off = rt["disagreement"] > float(cfg["roundtrip_tol"])
    feasible = violation <= 1e-6
    ok = (~off) & feasible
    with np.errstate(over="ignore"):  # a far off-manifold prediction of a log10 target overflows: None in the JSON
        phys = scaler.inverse_y(rt["preds"].double().cpu().numpy())
        phys_rt = scaler.inverse_y(rt["preds_rt"].double().cpu().numpy())
        known_y = scaler.inverse_y(data.y[nn_idx.flatten()].double().cpu().numpy()).reshape(*nn_idx.shape, len(targets))
        x_phys = scaler.inverse_x(rt["x"].double().cpu().numpy())
    out = []
    for g, alpha in enumerate(alphas):
        rows = range(g * n, (g + 1) * n)
        restarts = []
        for i in sorted(rows, key=lambda i: (not bool(ok[i]), -float(validated[i]))):
            neighbours = [{
                "id": data.ids[j], "formula": data.formulas[j], "split": data.split[j], "distance": float(dist[i, k]),
                "properties": {t: finite_float(known_y[i, k, c]) for c, t in enumerate(targets)},
            } for k, j in enumerate(nn_idx[i].tolist())]
            restarts.append({
                "restart": i - g * n, "start": starts[i - g * n], "ok": bool(ok[i]), "off_manifold": bool(off[i]),
                "feasible": bool(feasible[i]), "score": float(result.score[i]), "score_roundtrip": float(score_rt[i]),
                "validated_score": float(validated[i]), "disagreement": float(rt["disagreement"][i]),
                "loss": float(result.loss[i]), "steps": int(result.steps[i]), "final_lr": float(result.lr[i]),
                "predicted": {t: finite_float(phys[i, c]) for c, t in enumerate(targets)},
                "predicted_roundtrip": {t: finite_float(phys_rt[i, c]) for c, t in enumerate(targets)},
                "nn_distance": float(dist[i, 0]),  # to the nearest known compound (any split)
                "nn_distance_ratio": float(dist[i, 0]) / data.typical_nn if data.typical_nn > 0 else None,
                "nn_train_distance": float(train_dist[i, 0]),  # to the nearest training descriptor
                "neighbours": neighbours,
            })
        sl = slice(g * n, (g + 1) * n)
        best = restarts[0] if restarts and restarts[0]["ok"] else None
        summary = {
            "restarts": n, "on_manifold": int((~off[sl]).sum()), "off_manifold_rate": float(off[sl].float().mean()),
            "feasible": int(feasible[sl].sum()), "ok": int(ok[sl].sum()),
            "validated_score": float(validated[sl].max()), "best_score": float(result.score[sl].max()),
            "mean_steps": float(result.steps[sl].float().mean()), "seconds": result.seconds, "batch_rows": len(alphas) * n,
            "typical_nn_distance": data.typical_nn, "best_restart": best["restart"] if best else None,
            "ok_near_known": sum(1 for r in restarts if r["ok"] and r["nn_distance_ratio"] is not None
                                 and r["nn_distance_ratio"] <= float(cfg["near_ratio"])),
        }
        arrays = {"z": result.z[sl].cpu(), "z0": result.z0[sl].cpu(), "trajectory": result.trajectory[:, sl].cpu(),
                  "x": x_phys[sl]}
        out.append({"alpha": alpha, "summary": summary, "restarts": restarts, "_arrays": arrays})
    return out


# --- the design phase: a final model -> design.json and the tables beside it ----------------------

# units of the embedded table's properties (Ricci et al. 2017: 600 K, 1e20 cm^-3 doping); others: the table's own
UNITS = {"PF_p": "µW/(cm·K²)", "PF_n": "µW/(cm·K²)", "S_p": "µV/K", "S_n": "µV/K"}


def best_known(model, data: DesignData, objectives_cfg: Sequence[dict]) -> list[dict]:
    """Per objective task: the known compound with the best measured value, and what the model predicts for it
    (the model's own scale, to read a design's prediction against)."""
    targets = list(data.scaler.target_columns)
    out = []
    with np.errstate(over="ignore"):
        measured = data.scaler.inverse_y(data.y.double().cpu().numpy())
    for o in objectives_cfg:
        t = targets.index(o["task"])
        column = measured[:, t]
        mode = o.get("mode", "max")
        if not np.isfinite(column).any():
            continue
        if mode == "target":
            r = int(np.nanargmin(np.abs(column - float(o["target"]))))
        else:
            r = int(np.nanargmax(column) if mode == "max" else np.nanargmin(column))
        with frozen(model), torch.no_grad():
            pred = model.predict(model.encode(data.x[r : r + 1]))
        with np.errstate(over="ignore"):
            pred_phys = data.scaler.inverse_y(pred.double().cpu().numpy())[0, t]
        out.append({"task": o["task"], "mode": mode, "id": data.ids[r], "formula": data.formulas[r], "split": data.split[r],
                    "measured": finite_float(column[r]), "predicted": finite_float(pred_phys)})
    return out


def design_phase(model, cfg: dict, data: DesignData, device, progress: bool = False) -> dict:
    """The configured design plus the alpha study: the same restarts at each alpha of `alpha_study`, in the
    same batch as the design itself."""
    alphas = list(dict.fromkeys([float(cfg["alpha"]), *(float(a) for a in cfg["alpha_study"] or [])]))
    results = run_design(model, cfg, data, device, alphas=alphas, progress=progress)
    main = results[0]
    study = [{"alpha": r["alpha"], **{k: r["summary"][k] for k in ("off_manifold_rate", "ok", "restarts", "validated_score",
                                                                    "best_score", "mean_steps")}}
             for r in results if r["alpha"] in {float(a) for a in cfg["alpha_study"] or []}]
    main["alpha_study"] = sorted(study, key=lambda r: r["alpha"])
    main["best_known"] = best_known(model, data, cfg["objectives"])
    return main


def write_design_files(out_dir, result: dict, descriptor_columns: Sequence[str]) -> dict[str, str]:
    """trajectories.csv, latents.csv and descriptors.csv (physical units) beside design.json; returns their paths."""
    import pandas as pd

    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = result["_arrays"]
    n = arrays["z"].shape[0]
    paths = {}
    traj = pd.DataFrame(arrays["trajectory"].numpy(), columns=[f"r{r}" for r in range(n)])
    traj.insert(0, "step", np.arange(1, len(traj) + 1))
    latents = pd.DataFrame(arrays["z"].numpy(), columns=[f"z{i}" for i in range(arrays["z"].shape[1])])
    latents.insert(0, "restart", np.arange(n))
    descriptors = pd.DataFrame(arrays["x"], columns=list(descriptor_columns))
    descriptors.insert(0, "restart", np.arange(n))
    for name, frame in (("trajectories", traj), ("latents", latents), ("descriptors", descriptors)):
        path = out_dir / f"{name}.csv"
        tmp = path.with_suffix(".csv.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
        paths[name] = str(path)
    return paths
