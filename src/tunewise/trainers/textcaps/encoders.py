"""Per-group encoders phi_g of the textcaps trainer: each maps its view of an image into one shared latent space.

Groups are feature spaces (reference/methods.md): the image (`resnet18 | resnet34 | small_cnn`), the
caption/OCR text as character ids (`mlp_text | char_cnn_text | transformer_text`) or both (`combined`).
Every encoder ends in a projection to `latent_dim`, with dropout on the features before that projection
rather than on the latent itself: dropout on the latent would inflate the per-class covariances that the
anchor fit loss compares against the Gaussian anchors.

Inputs:
- images: `[B, 3, H, W]`, uint8 in 0..255 or float in [0, 1]; normalised inside with ImageNet statistics,
  so a user's ImageNet-pretrained ResNet sees what it was trained on and loaders can ship uint8 (4x less
  host-to-device traffic than float32).
- text: `[B, L]` int64 character ids, 0 = padding, ids < `vocab_size` (the data module guarantees the range;
  checking it here would cost a device sync every step).
- combined: a `(images, ids)` pair or a mapping with keys `"image"` and `"text"`.

Parameters are split into "backbone" (could start from pretrained weights: the ResNet trunk, or any trunk
loaded from a path) and "new" (everything else: projections, text encoders, fusion, and outside the encoders
the head and anchors), so the trainer can give them seed 001's `lr_backbone` / `lr_new`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from tunewise.runs import CheckpointError, load_checkpoint
from tunewise.trainers.textcaps.encoder_specs import (  # noqa: F401  (the names tests and the trainer import here)
    MODALITIES,
    TEXT_ENCODERS,
    TEXT_KEYS,
    VISUAL_ENCODERS,
    VISUAL_KEYS,
    check_encoder_spec,
    check_fusion,
    check_weights,
    combined_part,
)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Base of every encoder: `forward(x) -> [B, latent_dim]` and the backbone/new parameter split."""

    modality: str = ""
    latent_dim: int = 0

    def backbone_module_names(self) -> list[str]:
        """Names (relative to this module) of submodules whose parameters are "backbone"."""
        return []

    def backbone_parameter_names(self) -> set[str]:
        names = set()
        for sub in self.backbone_module_names():
            module = self.get_submodule(sub)
            names.update(f"{sub}.{n}" for n, _ in module.named_parameters())
        return names


def _projection(n_in: int, latent_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(n_in, latent_dim))


# ---------------------------------------------------------------- visual


def _small_cnn(width: int) -> tuple[nn.Module, int]:
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    # stride-2 stem and pools keep it cheap enough for the 2-core CPU default
    layers = [
        *block(3, width, 2),
        *block(width, 2 * width, 1),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width, 1),
        nn.MaxPool2d(2),
        *block(4 * width, 8 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers), 8 * width


def _resnet(arch: str) -> tuple[nn.Module, int]:
    trunk = getattr(torchvision.models, arch)(weights=None)
    n_features = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, n_features


def load_trunk_weights(trunk: nn.Module, path: str | Path, arch: str) -> None:
    """Load a state dict saved with torch.save from `path` into `trunk` (strict).

    Accepts a bare state dict or one under "state_dict"/"model", a DataParallel "module." prefix, and a
    full torchvision ResNet state dict (its ImageNet `fc.*` classifier is dropped: the projection replaces it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights: {str(path)!r} is neither 'none', 'imagenet' nor an existing file (a state dict for {arch})"
        )
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        # a config error (the weights key names a bad file): check_config reports it before any job runs
        raise ValueError(f"weights: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"weights: {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if isinstance(getattr(trunk, "fc", None), nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = trunk.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights: {path} does not fit a {arch} trunk: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)} in all), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)} in all)"
        )


class VisualEncoder(Encoder):
    modality = "visual"

    def __init__(
        self,
        arch: str,
        latent_dim: int,
        dropout: float = 0.0,
        weights: str | Path | None = "none",
        width: int = 32,
        channels_last: bool = False,
    ):
        super().__init__()
        if arch not in VISUAL_ENCODERS:
            raise ValueError(f"encoder: unknown visual encoder {arch!r} (expected one of {', '.join(VISUAL_ENCODERS)})")
        self.arch, self.latent_dim, self.channels_last = arch, int(latent_dim), bool(channels_last)
        if arch == "small_cnn":
            self.trunk, n_features = _small_cnn(int(width))
        else:
            self.trunk, n_features = _resnet(arch)
        # the ResNet trunk is pretrained-able even when it starts from scratch; small_cnn only when loaded
        self.pretrained = check_weights(arch, weights)
        if self.pretrained:
            load_trunk_weights(self.trunk, weights, arch)
        self.project = _projection(n_features, self.latent_dim, dropout)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)

    def backbone_module_names(self) -> list[str]:
        return ["trunk"] if self.arch != "small_cnn" or self.pretrained else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.arch}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.project(self.trunk(x))


# ---------------------------------------------------------------- text


def _padding_mask(ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() != 2:
        raise ValueError(f"text encoder: expected character ids [B, L], got {tuple(ids.shape)}")
    return ids != 0


class MLPText(Encoder):
    """Bag of characters: per-sample character frequencies (padding left out) through an MLP."""

    modality = "text"

    def __init__(self, vocab_size: int, latent_dim: int, dropout: float = 0.0, hidden: int = 256):
        super().__init__()
        self.vocab_size, self.latent_dim = int(vocab_size), int(latent_dim)
        self.mlp = nn.Sequential(nn.Linear(self.vocab_size, hidden), nn.ReLU(inplace=True))
        self.project = _projection(hidden, self.latent_dim, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = _padding_mask(ids)
        counts = torch.zeros(ids.shape[0], self.vocab_size, device=ids.device)
        # counts are small integers: exact in float32, so atomics cannot make this nondeterministic
        counts.scatter_add_(1, ids.long(), valid.float())
        freqs = counts / valid.sum(dim=1, keepdim=True).clamp(min=1)
        return self.project(self.mlp(freqs))


class CharCNNText(Encoder):
    """Character embeddings, parallel 1-D convolutions of several widths, max-pool over valid positions."""

    modality = "text"

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int,
        dropout: float = 0.0,
        embed_dim: int = 32,
        channels: int = 64,
        kernel_sizes: Sequence[int] = (3, 5, 7),
    ):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.embed = nn.Embedding(int(vocab_size), embed_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, k, padding=k // 2) for k in kernel_sizes)
        self.project = _projection(channels * len(kernel_sizes), self.latent_dim, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = _padding_mask(ids)
        x = self.embed(ids.long()).transpose(1, 2)  # [B, E, L]
        feats = []
        for conv in self.convs:
            h = torch.relu(conv(x))[..., : ids.shape[1]]  # even kernels would add one position
            # relu output >= 0, so 0 is a neutral fill for padding and for an all-padding text
            feats.append(h.masked_fill(~valid[:, None, :], 0.0).amax(dim=2))
        return self.project(torch.cat(feats, dim=1))


class TransformerText(Encoder):
    """A small pre-norm nn.TransformerEncoder over character embeddings + learned positions, masked mean-pool."""

    modality = "text"

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int,
        max_len: int,
        dropout: float = 0.0,
        embed_dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
    ):
        super().__init__()
        self.latent_dim, self.max_len = int(latent_dim), int(max_len)
        self.embed = nn.Embedding(int(vocab_size), embed_dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(self.max_len, embed_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim, heads, ff, dropout=dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        # nested tensors take a different kernel in eval than in train; one path keeps them comparable
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.project = _projection(embed_dim, self.latent_dim, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = _padding_mask(ids)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"transformer_text: texts of length {ids.shape[1]} exceed max_len={self.max_len}")
        # an all-padding row would mask every key and turn attention into NaN: let it attend to position 0
        valid = valid.clone()
        valid[:, 0] |= ~valid.any(dim=1)
        x = self.embed(ids.long()) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(x, src_key_padding_mask=~valid))
        w = valid.unsqueeze(-1).to(h.dtype)
        return self.project((h * w).sum(dim=1) / w.sum(dim=1))


# ---------------------------------------------------------------- combined


class CombinedEncoder(Encoder):
    """Both views of an image: each encoded to `latent_dim`, then fused.

    `concat` (default): Linear(2 * latent_dim -> latent_dim) over the concatenated latents, so the fusion
    learns how much of each modality to keep and in which directions. `sum`: z_visual + z_text, no extra
    parameters, which forces both encoders onto the same axes.
    """

    modality = "combined"

    def __init__(self, visual: Encoder, text: Encoder, latent_dim: int, fusion: str = "concat"):
        super().__init__()
        check_fusion(fusion)
        self.visual, self.text, self.latent_dim, self.fusion = visual, text, int(latent_dim), fusion
        self.fuse = nn.Linear(2 * self.latent_dim, self.latent_dim) if fusion == "concat" else None

    def backbone_module_names(self) -> list[str]:
        return [f"visual.{n}" for n in self.visual.backbone_module_names()] + [
            f"text.{n}" for n in self.text.backbone_module_names()
        ]

    def forward(self, inputs) -> torch.Tensor:
        if isinstance(inputs, Mapping):
            images, ids = inputs["image"], inputs["text"]
        else:
            images, ids = inputs
        zv, zt = self.visual(images), self.text(ids)
        if self.fuse is None:
            return zv + zt
        return self.fuse(torch.cat([zv, zt], dim=1))


# ---------------------------------------------------------------- factory

def _options(spec: Mapping, keys: set[str]) -> dict:
    return {k: spec[k] for k in keys if k in spec}


def build_encoder(
    spec: Mapping,
    latent_dim: int,
    dropout: float = 0.0,
    *,
    vocab_size: int | None = None,
    max_len: int | None = None,
    channels_last: bool = False,
) -> Encoder:
    """One group's encoder from its config entry.

    spec examples:
      {name: image, modality: visual, encoder: resnet18, weights: none}            # weights: none|imagenet|<path>
      {name: image, modality: visual, encoder: small_cnn, width: 32}
      {name: ocr, modality: text, encoder: char_cnn_text, channels: 64}
      {name: both, modality: combined, fusion: concat,
       visual: {encoder: small_cnn}, text: {encoder: mlp_text}}                   # or visual: small_cnn
    `vocab_size` (ids 0..vocab_size-1, 0 = padding) is required for text encoders, `max_len` for
    transformer_text. Unknown keys raise, so a typo in the config is not silently ignored.
    """
    check_encoder_spec(spec, vocab_size=vocab_size, max_len=max_len)
    modality, name = spec["modality"], spec.get("encoder")
    if modality == "combined":
        parts = {
            part: build_encoder(combined_part(spec, part), latent_dim, dropout, vocab_size=vocab_size, max_len=max_len,
                                channels_last=channels_last)
            for part in ("visual", "text")
        }
        return CombinedEncoder(parts["visual"], parts["text"], latent_dim, spec.get("fusion", "concat"))
    if modality == "visual":
        return VisualEncoder(name, latent_dim, dropout, channels_last=channels_last, **_options(spec, VISUAL_KEYS))
    options = _options(spec, TEXT_KEYS[name])
    if name == "mlp_text":
        return MLPText(vocab_size, latent_dim, dropout, **options)
    if name == "char_cnn_text":
        return CharCNNText(vocab_size, latent_dim, dropout, **options)
    return TransformerText(vocab_size, latent_dim, max_len, dropout, **options)


# ---------------------------------------------------------------- parameter split


def backbone_prefixes(model: nn.Module) -> list[str]:
    """Full names of the backbone submodules of every encoder inside `model`, e.g. ["encoders.0.trunk"].

    Suits `optim.param_groups`-style prefix overrides: {prefix: {"lr": lr_backbone}} for each.
    """
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, Encoder):
            for sub in module.backbone_module_names():
                full = f"{name}.{sub}" if name else sub
                if not any(full == p or full.startswith(p + ".") for p in prefixes):
                    prefixes.append(full)
    return prefixes


def split_parameters(model: nn.Module) -> dict[str, list[str]]:
    """{"backbone": [...], "new": [...]}: parameter names of `model`, a partition of named_parameters()."""
    prefixes = backbone_prefixes(model)
    split: dict[str, list[str]] = {"backbone": [], "new": []}
    for name, _ in model.named_parameters():
        is_backbone = any(name.startswith(p + ".") for p in prefixes)
        split["backbone" if is_backbone else "new"].append(name)
    return split


def parameter_groups(model: nn.Module, lr_backbone: float, lr_new: float) -> list[dict]:
    """Optimizer parameter groups {"name", "params", "lr"} for seed 001's differential learning rates.

    Frozen parameters (requires_grad False) are left out; an empty group is left out too.
    """
    split = split_parameters(model)
    params = dict(model.named_parameters())
    groups = []
    for name, lr in (("backbone", lr_backbone), ("new", lr_new)):
        chosen = [params[n] for n in split[name] if params[n].requires_grad]
        if chosen:
            groups.append({"name": name, "params": chosen, "lr": float(lr)})
    return groups
