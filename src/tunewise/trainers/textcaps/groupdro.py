"""GroupDRO (Sagawa et al. 2020, after kohpangwei/group_DRO `loss.py`): adversarial group weights q.

Each training step gets the per-group mean losses l_g of the batch and the group counts n_g(batch):
  1. smoothed losses (kept in every mode, used by `update_mode: exp_smooth`) for present groups:
     a_g <- gamma * a_g + (1 - gamma) * l_g, the first observation initialising a_g. gamma weighs the past,
     so a higher gamma smooths more (seed 001 reads it so: "0.95 for more smoothing").
  2. the update signal is l_g (`plain`) or a_g (`exp_smooth`), plus the generalisation adjustment
     C / sqrt(N_g) with N_g the group's size in the training set (the paper's C / sqrt(n_g));
  3. q_g <- q_g * exp(eta * signal_g) over the groups present in the batch, renormalised so that the present
     groups keep the mass they had: an absent group's q is left exactly as it was (it had no loss to judge
     it by), and q still sums to 1. Computed in log space and float64, so large eta cannot overflow;
  4. objective `weighted`: sum_g q_g l_g with the updated q and no gradient through q (as the reference);
     `max`: the largest present l_g.
During `warmup_epochs` (seed 001 recommends 5) it is plain ERM: q stays uniform, the objective is the
per-sample mean sum_g n_g l_g / sum_g n_g, and only the smoothed losses are tracked. `enabled: false`
is ERM throughout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunewise.trainers.textcaps.options import OBJECTIVES, UPDATE_MODES  # noqa: E402,F401  (re-exported)


def group_mean_losses(losses: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of per-sample losses `[N]` with group ids `[N]`: (means `[G]`, counts `[G]`).

    Absent groups get mean 0 and count 0 (never 0/0, whose backward would be NaN). A one-hot matmul
    rather than scatter_add: float atomics make scatter nondeterministic on CUDA.
    """
    if losses.dim() != 1 or losses.shape != groups.shape:
        raise ValueError(f"group_mean_losses: expected losses and groups of one shape [N], got "
                         f"{tuple(losses.shape)} and {tuple(groups.shape)}")
    losses = losses.float()
    onehot = F.one_hot(groups.long(), n_groups).to(losses.dtype)
    counts = onehot.sum(0)
    return (losses @ onehot) / counts.clamp_min(1), counts


class GroupDRO:
    """The adversarial weights and their objective; `q` is exposed for logging, state_dict for resume."""

    def __init__(
        self,
        n_groups: int,
        eta: float = 0.01,
        gamma: float = 0.9,
        update_mode: str = "exp_smooth",
        objective: str = "weighted",
        warmup_epochs: int = 0,
        adjustment: float | Sequence[float] = 0.0,
        group_sizes: Sequence[int] | torch.Tensor | None = None,
        enabled: bool = True,
        device: torch.device | str | None = None,
    ):
        if n_groups < 1:
            raise ValueError(f"GroupDRO: n_groups must be >= 1, got {n_groups}")
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"groupdro.update_mode: expected one of {', '.join(UPDATE_MODES)}, got {update_mode!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"groupdro.objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if eta < 0 or not 0 <= gamma < 1 or warmup_epochs < 0:
            raise ValueError(f"groupdro: need eta >= 0, 0 <= gamma < 1, warmup_epochs >= 0; got {eta}, {gamma}, {warmup_epochs}")
        self.n_groups, self.eta, self.gamma = int(n_groups), float(eta), float(gamma)
        self.update_mode, self.objective, self.warmup_epochs = update_mode, objective, int(warmup_epochs)
        self.enabled = bool(enabled)
        device = torch.device(device or "cpu")
        adj = torch.as_tensor(adjustment, dtype=torch.float64).expand(self.n_groups).clone()
        if (adj != 0).any():
            if group_sizes is None:
                raise ValueError("groupdro.adjustment: needs the training-set group sizes (group_sizes)")
            sizes = torch.as_tensor(group_sizes, dtype=torch.float64)
            if sizes.shape != (self.n_groups,) or (sizes <= 0).any():
                raise ValueError(f"groupdro: group_sizes must be {self.n_groups} positive counts, got {sizes.tolist()}")
            adj = adj / sizes.sqrt()
        self.adjust = adj.to(device)
        self.q = torch.full((self.n_groups,), 1.0 / self.n_groups, dtype=torch.float64, device=device)
        self.avg_loss = torch.zeros(self.n_groups, dtype=torch.float64, device=device)
        self.avg_seen = torch.zeros(self.n_groups, dtype=torch.bool, device=device)
        self.epoch = 0
        self.updates = 0

    # ------------------------------------------------------------ schedule

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every training epoch (0-based): decides warm-up."""
        self.epoch = int(epoch)

    @property
    def in_warmup(self) -> bool:
        return not self.enabled or self.epoch < self.warmup_epochs

    # ------------------------------------------------------------ update and objective

    def _to(self, device: torch.device) -> None:
        if self.q.device != device:
            self.q, self.avg_loss, self.avg_seen, self.adjust = (
                t.to(device) for t in (self.q, self.avg_loss, self.avg_seen, self.adjust)
            )

    def step(self, per_group_loss: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        """Update q from one training batch and return the objective to backpropagate."""
        self._check(per_group_loss, group_counts)
        self._to(per_group_loss.device)
        present = group_counts > 0
        observed = per_group_loss.detach().to(torch.float64)
        smoothed = self.gamma * self.avg_loss + (1 - self.gamma) * observed
        self.avg_loss = torch.where(present, torch.where(self.avg_seen, smoothed, observed), self.avg_loss)
        self.avg_seen = self.avg_seen | present
        if not self.in_warmup:
            signal = (self.avg_loss if self.update_mode == "exp_smooth" else observed) + self.adjust
            logits = torch.where(present, self.q.log() + self.eta * signal, float("-inf"))
            mass = torch.where(present, self.q, 0.0).sum()
            # softmax over present groups only; with none present (an empty batch) it is all NaN and
            # `where` keeps every q as it was. No `if`: testing `present.any()` would sync the device.
            moved = torch.softmax(logits, dim=0) * mass
            self.q = torch.where(present, moved, self.q)
            self.updates += 1
        return self.objective_value(per_group_loss, group_counts)

    def objective_value(self, per_group_loss: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        """The objective with the current q and no update (e.g. a validation loss)."""
        self._check(per_group_loss, group_counts)
        present = group_counts > 0
        loss = torch.where(present, per_group_loss, torch.zeros_like(per_group_loss))
        counts = group_counts.to(loss.dtype)
        if self.in_warmup:
            return (loss * counts).sum() / counts.sum().clamp_min(1)
        if self.objective == "max":
            # with no group present: 0, still connected to the graph
            return torch.where(present.any(), torch.where(present, loss, float("-inf")).max(), loss.sum())
        return (self.q.to(device=loss.device, dtype=loss.dtype) * loss).sum()

    def _check(self, per_group_loss: torch.Tensor, group_counts: torch.Tensor) -> None:
        if per_group_loss.shape != (self.n_groups,) or group_counts.shape != (self.n_groups,):
            raise ValueError(
                f"GroupDRO: expected per-group losses and counts of shape [{self.n_groups}], got "
                f"{tuple(per_group_loss.shape)} and {tuple(group_counts.shape)}"
            )

    # ------------------------------------------------------------ logging and resume

    def log_values(self, group_names: Sequence[str] | None = None) -> dict[str, float]:
        """{"q/<group>": q_g} for the per-epoch metrics."""
        names = list(group_names) if group_names is not None else [str(g) for g in range(self.n_groups)]
        if len(names) != self.n_groups:
            raise ValueError(f"GroupDRO.log_values: {len(names)} names for {self.n_groups} groups")
        return {f"q/{name}": value for name, value in zip(names, self.q.tolist())}

    def concentration(self) -> dict[str, float]:
        """How q spreads its weight, for the diagnosis: {"groupdro/q_entropy": H(q) / log G (1 uniform, 0 one group
        takes all), "groupdro/q_max": the largest q_g}."""
        q = self.q.detach().double().cpu()
        entropy = float(-(q * q.clamp_min(1e-300).log()).sum())
        norm = float(torch.log(torch.tensor(float(self.n_groups)))) if self.n_groups > 1 else 1.0
        return {"groupdro/q_entropy": entropy / norm if self.n_groups > 1 else 1.0, "groupdro/q_max": float(q.max())}

    def state_dict(self) -> dict:
        return {
            "n_groups": self.n_groups,
            "q": self.q.detach().cpu().clone(),
            "avg_loss": self.avg_loss.detach().cpu().clone(),
            "avg_seen": self.avg_seen.detach().cpu().clone(),
            "epoch": self.epoch,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["n_groups"]) != self.n_groups:
            raise ValueError(f"GroupDRO.load_state_dict: state has {state['n_groups']} groups, this has {self.n_groups}")
        device = self.q.device
        self.q = state["q"].to(device=device, dtype=torch.float64).clone()
        self.avg_loss = state["avg_loss"].to(device=device, dtype=torch.float64).clone()
        self.avg_seen = state["avg_seen"].to(device=device, dtype=torch.bool).clone()
        self.epoch, self.updates = int(state["epoch"]), int(state["updates"])
