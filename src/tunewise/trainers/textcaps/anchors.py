"""Gaussian class anchors in the shared latent space, the Bures-Wasserstein-2 fit loss, separation, head.

Each class c has a learned anchor N(m_c, S_c) with S_c = L_c L_c^T + anchor_eps * I (L_c lower triangular),
PSD by construction and positive definite thanks to eps. The fit loss pulls each class's batch Gaussian
(mean, covariance + eps I of its latents) towards its anchor in squared W2; the separation loss keeps the
anchors apart, either through the head (`classifier`: reparameterised anchor samples must be classified
correctly) or directly (`w2_margin`: hinge on pairwise anchor W2 below `sep_margin`).
The trainer's total is CE + lambda_fit * fit + lambda_sep * sep.

PSD square root: symmetric eigendecomposition with eigenvalues clamped at `floor`, and a custom backward
that solves the Sylvester equation Y X + X Y = dY in the eigenbasis, X_ij = dY_ij / (s_i + s_j). PyTorch's
own eigh backward divides by eigenvalue gaps (lambda_i - lambda_j) and returns inf/NaN whenever eigenvalues
repeat: for the identity, for eps * I of an empty class, for identical anchors; (s_i + s_j) >= 2 sqrt(floor)
never vanishes. The outer square root of W2 needs only its trace, sum_i sqrt(eigvalsh(M)_i), whose gradient
U diag(1 / (2 sqrt(lambda))) U^T has no gap terms either.

All of it runs in float32 (or float64 if given) with autocast off: eigh has no bf16 kernel, and the
covariance differences that W2 measures are lost at bf16 precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tunewise.trainers.textcaps.options import SEP_METHODS  # noqa: E402,F401  (re-exported)

DEFAULT_FLOOR = 1e-10


def _float(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


class _PSDSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, floor: float) -> torch.Tensor:
        a = (a + a.mT) / 2
        evals, evecs = torch.linalg.eigh(a)
        s = evals.clamp_min(floor).sqrt()
        ctx.save_for_backward(evecs, s)
        return evecs @ (s.unsqueeze(-1) * evecs.mT)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        evecs, s = ctx.saved_tensors
        g = evecs.mT @ ((grad + grad.mT) / 2) @ evecs
        g = g / (s.unsqueeze(-1) + s.unsqueeze(-2))
        return evecs @ g @ evecs.mT, None


def psd_sqrt(a: torch.Tensor, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Symmetric square root of PSD matrices `[..., d, d]` (eigenvalues clamped at `floor`).

    Gradients are finite for repeated and zero eigenvalues (bounded by 1 / (2 sqrt(floor))); first order only.
    """
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"psd_sqrt: expected square matrices, got {tuple(a.shape)}")
    return _PSDSqrt.apply(a, float(floor))


def w2_squared(
    m1: torch.Tensor, s1: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor, floor: float = DEFAULT_FLOOR
) -> torch.Tensor:
    """Squared Bures-Wasserstein-2 distance between N(m1, s1) and N(m2, s2), batched over leading dims.

    W2^2 = |m1 - m2|^2 + tr(s1 + s2 - 2 (s2^1/2 s1 s2^1/2)^1/2), clamped at 0 against round-off.
    Means `[..., d]`, covariances `[..., d, d]`; returns `[...]`.
    """
    with torch.autocast(device_type=m1.device.type, enabled=False):
        m1, s1, m2, s2 = _float(m1, s1, m2, s2)
        root2 = psd_sqrt(s2, floor)
        cross = root2 @ s1 @ root2
        cross = (cross + cross.mT) / 2
        cross_trace = torch.linalg.eigvalsh(cross).clamp_min(floor).sqrt().sum(-1)
        trace = torch.diagonal(s1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(s2, dim1=-2, dim2=-1).sum(-1)
        return (((m1 - m2) ** 2).sum(-1) + trace - 2 * cross_trace).clamp_min(0)


def class_moments(
    z: torch.Tensor, y: torch.Tensor, num_classes: int, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class batch mean `[C, d]`, unbiased covariance + eps I `[C, d, d]` and count `[C]` of latents z.

    A class absent from the batch gets mean 0 and covariance eps I; one with a single sample its sample as
    mean and covariance eps I (one point has no spread). Callers mask by count (see `fit_loss`). One-hot
    matmuls rather than scatter: deterministic on CUDA and free of per-class Python loops.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        (z,) = _float(z)
        onehot = F.one_hot(y.long(), num_classes).to(z.dtype)  # [N, C]
        counts = onehot.sum(0)
        means = (onehot.T @ z) / counts.clamp_min(1).unsqueeze(1)
        centered = z - means[y.long()]
        scatter = torch.einsum("nc,nd,ne->cde", onehot, centered, centered)
        covs = scatter / (counts - 1).clamp_min(1)[:, None, None]
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return means, covs + eps * eye, counts


class GaussianAnchors(nn.Module):
    """Learned N(m_c, L_c L_c^T + eps I) per class; `mean` [C, d], `scale` [C, d, d] (lower triangle used).

    Means start as N(0, mean_std^2) draws from the global torch RNG (seed it for determinism); covariances
    start at (init_std^2 + eps) I.
    """

    def __init__(self, num_classes: int, latent_dim: int, eps: float = 1e-4, init_std: float = 1.0, mean_std: float = 1.0):
        super().__init__()
        if num_classes < 2 or latent_dim < 1 or eps < 0:
            raise ValueError(
                f"GaussianAnchors: need num_classes >= 2, latent_dim >= 1, anchor_eps >= 0; got "
                f"{num_classes}, {latent_dim}, {eps}"
            )
        self.num_classes, self.latent_dim, self.eps = int(num_classes), int(latent_dim), float(eps)
        self.mean = nn.Parameter(torch.randn(num_classes, latent_dim) * mean_std)
        self.scale = nn.Parameter(torch.eye(latent_dim).repeat(num_classes, 1, 1) * init_std)

    def factor(self) -> torch.Tensor:
        return torch.tril(self.scale)

    def covariance(self) -> torch.Tensor:
        factor = self.factor()
        eye = torch.eye(self.latent_dim, dtype=factor.dtype, device=factor.device)
        return factor @ factor.mT + self.eps * eye

    def sample(self, n_per_class: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised draws, `n_per_class` per class: (z [C * n, d], labels [C * n]).

        z = m + L u + sqrt(eps) v with u, v ~ N(0, I), so gradients reach mean and scale. A generator
        must live on the anchors' device.
        """
        shape = (self.num_classes, int(n_per_class), self.latent_dim)
        kw = {"generator": generator, "device": self.mean.device, "dtype": self.mean.dtype}
        u, v = torch.randn(shape, **kw), torch.randn(shape, **kw)
        z = self.mean.unsqueeze(1) + u @ self.factor().mT + self.eps**0.5 * v
        labels = torch.arange(self.num_classes, device=self.mean.device).repeat_interleave(int(n_per_class))
        return z.reshape(-1, self.latent_dim), labels


def fit_loss(
    z: torch.Tensor, y: torch.Tensor, anchors: GaussianAnchors, min_count: int = 2, floor: float = DEFAULT_FLOOR
) -> torch.Tensor:
    """Mean squared W2 between each class's batch Gaussian and its anchor, over classes with >= min_count samples.

    Squared, not W2 itself: sqrt has an infinite slope at 0, i.e. exactly where the fit is perfect.
    Classes below min_count (default 2: one sample has no covariance) are masked, not indexed out, which
    avoids a device sync; a batch with none returns a zero that stays connected to the graph.
    """
    means, covs, counts = class_moments(z, y, anchors.num_classes, anchors.eps)
    w2 = w2_squared(means, covs, anchors.mean, anchors.covariance(), floor)
    present = (counts >= min_count).to(w2.dtype)
    return (w2 * present).sum() / present.sum().clamp_min(1)


def separation_loss(
    anchors: GaussianAnchors,
    method: str = "classifier",
    head: nn.Module | None = None,
    samples_per_class: int = 16,
    margin: float = 1.0,
    generator: torch.Generator | None = None,
    floor: float = DEFAULT_FLOOR,
) -> torch.Tensor:
    """Keep the anchors apart.

    classifier: cross-entropy of `head` on `samples_per_class` reparameterised samples of each anchor
      (gradients reach the anchors and the head).
    w2_margin: mean over anchor pairs of relu(margin^2 - W2^2): zero once every pair is at least `margin`
      apart in W2; on the squared distance because sqrt's slope is infinite for coinciding anchors.
    """
    if method == "classifier":
        if head is None:
            raise ValueError("separation_loss: sep_method 'classifier' needs the head")
        z, labels = anchors.sample(samples_per_class, generator)
        return F.cross_entropy(head(z).float(), labels)
    if method == "w2_margin":
        i, j = torch.triu_indices(anchors.num_classes, anchors.num_classes, 1, device=anchors.mean.device)
        mean, cov = anchors.mean, anchors.covariance()
        w2 = w2_squared(mean[i], cov[i], mean[j], cov[j], floor)
        return torch.relu(float(margin) ** 2 - w2).mean()
    raise ValueError(f"sep_method: unknown separation {method!r} (expected one of {', '.join(SEP_METHODS)})")


def anchor_losses(
    z: torch.Tensor,
    y: torch.Tensor,
    anchors: GaussianAnchors,
    head: nn.Module | None,
    sep_method: str = "classifier",
    sep_samples_per_class: int = 16,
    sep_margin: float = 1.0,
    generator: torch.Generator | None = None,
    min_count: int = 2,
) -> dict[str, torch.Tensor]:
    """{"fit": ..., "sep": ...} for one batch; the trainer adds lambda_fit * fit + lambda_sep * sep to CE."""
    return {
        "fit": fit_loss(z, y, anchors, min_count),
        "sep": separation_loss(anchors, sep_method, head, sep_samples_per_class, sep_margin, generator),
    }


def build_head(latent_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """The shared head psi: linear when hidden == 0, else Linear -> ReLU -> Dropout -> Linear."""
    if hidden < 0:
        raise ValueError(f"head_hidden: must be >= 0, got {hidden}")
    if hidden == 0:
        return nn.Linear(latent_dim, num_classes)
    return nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )
