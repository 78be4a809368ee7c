"""The `latent` trainer's model, loss and metrics (seed 003).

encoder: descriptor x -> latent z (optionally tanh-bounded, which gives latent optimisation a
box to stay in); one head per property: z -> prediction; decoder: z -> reconstructed x. The
decoder is what turns an optimised z back into a descriptor, so it is trained jointly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _mlp(n_in: int, width: int, depth: int, n_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.SiLU(), nn.Dropout(dropout)]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class LatentModel(nn.Module):
    def __init__(
        self,
        n_in: int,
        n_tasks: int,
        hidden: int = 256,
        latent_dim: int = 64,
        depth: int = 2,
        dropout: float = 0.0,
        head_hidden: int = 64,
        tanh_latent: bool = False,
    ):
        super().__init__()
        if n_in < 1 or n_tasks < 1 or latent_dim < 1 or depth < 0 or hidden < 1 or head_hidden < 0:
            raise ValueError(
                f"LatentModel: need n_in, n_tasks, hidden, latent_dim >= 1, depth, head_hidden >= 0; got "
                f"n_in={n_in}, n_tasks={n_tasks}, hidden={hidden}, latent_dim={latent_dim}, depth={depth}, "
                f"head_hidden={head_hidden}"
            )
        self.n_in, self.n_tasks, self.latent_dim = n_in, n_tasks, latent_dim
        self.tanh_latent = tanh_latent
        self.encoder = _mlp(n_in, hidden, depth, latent_dim, dropout)
        self.heads = nn.ModuleList(
            nn.Linear(latent_dim, 1) if head_hidden == 0 else _mlp(latent_dim, head_hidden, 1, 1, 0.0)
            for _ in range(n_tasks)
        )
        self.decoder = _mlp(latent_dim, hidden, depth, n_in, dropout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return torch.tanh(z) if self.tanh_latent else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] -> [B, n_tasks]."""
        return torch.cat([head(z) for head in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.predict(z), self.decode(z)


def multitask_loss(
    preds: torch.Tensor,
    y: torch.Tensor,
    recon: torch.Tensor,
    x: torch.Tensor,
    task_weights: torch.Tensor | None,
    recon_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_t w_t * MSE_t(observed targets of task t) + recon_weight * MSE(recon, x).

    Missing targets (NaN in y) are masked out; a task with none observed in the batch adds 0
    (its head gets no gradient from this batch, and nothing turns into NaN). Computed in float32
    so AMP's half-precision outputs do not lose the small differences.
    Returns (total, parts) with parts["task"], parts["recon"] (scalars) and parts["per_task"]
    ([n_tasks]), all detached.
    """
    preds, recon, x = preds.float(), recon.float(), x.float()
    observed = ~torch.isnan(y)
    # fill before subtracting: NaN in an unused branch of `where` would still poison the gradient
    diff = torch.where(observed, preds - torch.nan_to_num(y.float(), nan=0.0), torch.zeros_like(preds))
    counts = observed.sum(dim=0)
    per_task = diff.pow(2).sum(dim=0) / counts.clamp(min=1)
    weights = torch.ones_like(per_task) if task_weights is None else task_weights.to(per_task)
    task = (weights * per_task).sum()
    recon_mse = torch.mean((recon - x) ** 2)
    total = task + float(recon_weight) * recon_mse
    parts = {"task": task.detach(), "recon": recon_mse.detach(), "per_task": per_task.detach()}
    return total, parts


@torch.no_grad()
def regression_metrics(preds: torch.Tensor, y: torch.Tensor, task_names: Sequence[str]) -> dict[str, float]:
    """Per task `r2/<task>` and `mae/<task>` over observed targets, and `r2_mean`, `mae_mean`.

    Both are in standardised (log10 where configured) target units: R^2 is scale invariant;
    MAE is in units of the train split's standard deviation, comparable across tasks.
    A task with fewer than 2 observed values (or constant ones) has no R^2 (NaN) and is left out
    of the means; NaN predictions are not left out: they make the metric NaN, as they should.
    """
    preds, y = preds.detach().double(), y.detach().double()
    if preds.shape != y.shape or preds.shape[1] != len(task_names):
        raise ValueError(f"regression_metrics: preds {tuple(preds.shape)}, y {tuple(y.shape)}, {len(task_names)} tasks")
    out: dict[str, float] = {}
    r2s, maes = [], []
    for t, name in enumerate(task_names):
        observed = ~torch.isnan(y[:, t])
        target, pred = y[observed, t], preds[observed, t]
        mae = float((pred - target).abs().mean()) if len(target) else float("nan")
        total = float(((target - target.mean()) ** 2).sum()) if len(target) else 0.0
        if len(target) >= 2 and total > 0:
            r2 = 1.0 - float(((pred - target) ** 2).sum()) / total
            r2s.append(r2)
        else:
            r2 = float("nan")
        if len(target):
            maes.append(mae)
        out[f"r2/{name}"] = r2
        out[f"mae/{name}"] = mae
    out["r2_mean"] = sum(r2s) / len(r2s) if r2s else float("nan")
    out["mae_mean"] = sum(maes) / len(maes) if maes else float("nan")
    return out
