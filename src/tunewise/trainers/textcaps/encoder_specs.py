"""The encoder specs of the textcaps trainer (`model.visual`, `model.text`, a group's own spec) and their checks.

Torch-free: validating a config checks every spec here, before any job, without importing torch;
`encoders.build_encoder` runs the same check before it builds. Only what needs the weights themselves (a
state dict that does not fit its trunk, a truncated file) is found when the model is first built, at data
preparation (`TextCapsTrainer.check_config`), still before any training.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tunewise.runs import CheckpointError, refuse_lfs_pointer

VISUAL_ENCODERS = ("resnet18", "resnet34", "small_cnn")
TEXT_ENCODERS = ("mlp_text", "char_cnn_text", "transformer_text")
MODALITIES = ("visual", "text", "combined")
FUSIONS = ("concat", "sum")

VISUAL_KEYS = {"weights", "width"}
TEXT_KEYS = {
    "mlp_text": {"hidden"},
    "char_cnn_text": {"embed_dim", "channels", "kernel_sizes"},
    "transformer_text": {"embed_dim", "heads", "layers", "ff"},
}
GROUP_KEYS = {"name", "modality", "encoder"}

IMAGENET_ERROR = (
    "weights: 'imagenet' would download ImageNet weights, and nothing can be downloaded here. Save a "
    "torchvision {arch} state dict on a machine that has it (torch.save(torchvision.models.{arch}("
    "weights='IMAGENET1K_V1').state_dict(), 'resnet.pt')) and pass its path as weights, or use weights: none."
)


def check_keys(spec: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: unknown fusion {fusion!r} (expected one of {', '.join(FUSIONS)})")


def check_weights(arch: str, weights) -> bool:
    """Whether the visual trunk starts from weights (a file); 'imagenet' is refused (it would download)."""
    weights = "none" if weights is None else weights
    if str(weights).lower() == "imagenet":
        if arch == "small_cnn":
            raise ValueError("weights: small_cnn has no ImageNet weights; use none or a path to its own state dict")
        raise ValueError(IMAGENET_ERROR.format(arch=arch))
    if str(weights).lower() == "none":
        return False
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights: {str(path)!r} is neither 'none', 'imagenet' nor an existing file (a state dict for {arch})"
        )
    try:
        refuse_lfs_pointer(path)
    except CheckpointError as e:
        # a config error (the weights key names a bad file): reported before any job runs
        raise ValueError(f"weights: {e}") from None
    return True


def check_encoder_spec(spec: Mapping, *, vocab_size: int | None = None, max_len: int | None = None) -> None:
    """Raise ValueError/FileNotFoundError naming the group and key for a spec `build_encoder` cannot build."""
    modality = spec.get("modality")
    where = f"groups[{spec.get('name', '?')}]"
    if modality not in MODALITIES:
        raise ValueError(f"{where}.modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")
    if modality == "combined":
        check_keys(spec, GROUP_KEYS | {"visual", "text", "fusion"}, where)
        for part in ("visual", "text"):
            sub = combined_part(spec, part)
            check_encoder_spec(sub, vocab_size=vocab_size, max_len=max_len)
        check_fusion(spec.get("fusion", "concat"))
        return
    name = spec.get("encoder")
    if modality == "visual":
        if name not in VISUAL_ENCODERS:
            raise ValueError(f"{where}.encoder: expected one of {', '.join(VISUAL_ENCODERS)}, got {name!r}")
        check_keys(spec, GROUP_KEYS | VISUAL_KEYS, where)
        check_weights(name, spec.get("weights", "none"))
        return
    if name not in TEXT_ENCODERS:
        raise ValueError(f"{where}.encoder: expected one of {', '.join(TEXT_ENCODERS)}, got {name!r}")
    check_keys(spec, GROUP_KEYS | TEXT_KEYS[name], where)
    if vocab_size is None or int(vocab_size) < 2:
        raise ValueError(f"{where}: text encoders need vocab_size >= 2 (padding id 0 plus characters), got {vocab_size}")
    if name == "transformer_text" and max_len is None:
        raise ValueError(f"{where}: transformer_text needs max_len (the padded text length)")


def combined_part(spec: Mapping, part: str) -> dict:
    """The visual or text part of a combined group's spec, as a spec of its own."""
    sub = spec.get(part)
    if sub is None:
        raise ValueError(f"groups[{spec.get('name', '?')}].{part}: a combined group needs a {part} encoder spec")
    sub = {"encoder": sub} if isinstance(sub, str) else dict(sub)
    return {"name": f"{spec.get('name', '?')}.{part}", "modality": part, **sub}
