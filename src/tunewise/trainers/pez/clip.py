"""The CLIP that PEZ optimises prompts against: one loader for any open_clip model (a pretrained tag
already on disk, or a local checkpoint), and the embedded default, a tiny CLIP trained here on the
synthetic shapes of `shapes.py`.

Files `train_tiny_clip(data_dir, out_dir, ...)` writes under out_dir:
  tunewise-tiny-clip.json  the open_clip model config (registered under its file stem by load_clip)
  tiny_clip.pt             {"epoch", "name", "state_dict"} as open_clip's own training saves it
  clip_vocab.json          token ids the training captions use (all other embedding rows are untrained)
  clip_metrics.json        held-out retrieval accuracy, size, timing (written last)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tunewise.runs import atomic_write_text
from tunewise.trainers.pez import CHECKPOINT_NAME, TINY_CLIP_NAME, TINY_IMAGE_SIZE
from tunewise.trainers.pez.shapes import load_split

# The 49,408 x width token embedding dominates the size, hence a narrow text tower; vocab_size stays
# the standard one so open_clip's SimpleTokenizer (and PEZ's projection onto its vocabulary) work as-is.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "width": 96, "head_width": 32, "layers": 2,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


class LoadedClip(NamedTuple):
    model: torch.nn.Module  # eval mode
    tokenizer: object  # open_clip tokenizer: list[str] -> LongTensor [N, context_length]
    preprocess: object  # open_clip's eval transform (PIL -> tensor); arrays: normalise_images


def write_model_config(out_dir: str | Path, name: str = TINY_CLIP_NAME, config: dict | None = None) -> Path:
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config or TINY_CLIP_CONFIG, indent=2))
    return path


def build_tiny_clip(config_dir: str | Path, config: dict | None = None) -> torch.nn.Module:
    """A randomly initialised tiny CLIP built by open_clip from a registered config file (no download)."""
    open_clip.add_model_config(write_model_config(config_dir, TINY_CLIP_NAME, config))
    return open_clip.create_model(TINY_CLIP_NAME, pretrained=None, device="cpu")


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, epoch: int, config: dict | None = None) -> Path:
    """open_clip's training checkpoint layout, plus the model config next to it for load_clip."""
    out = Path(out_dir)
    write_model_config(out, TINY_CLIP_NAME, config)
    path = out / CHECKPOINT_NAME
    torch.save({"epoch": epoch, "name": TINY_CLIP_NAME, "state_dict": model.state_dict()}, path)
    return path


def normalise_images(images: np.ndarray | torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """uint8 [N, H, W, 3] (already at the model's image size) -> float [N, 3, H, W] with its mean/std."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _cached_pretrained(model: str, tag: str) -> tuple[str, dict]:
    """Path of a pretrained tag's weights if already on disk, else an error saying where they were looked
    for; nothing is downloaded (the workflow runs offline)."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"pretrained tag {tag!r} is unknown for open_clip model {model!r} (known: {known}); "
                         f"for a local weights file pass `checkpoint: /path/to/file`")
    looked, how = [], []
    if cfg.get("file"):
        looked.append(cfg["file"])
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        repo, fname = os.path.split(cfg["hf_hub"])  # "org/repo/" names the repo's default weights file
        for f in ([fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, f)
            if isinstance(hit, str):
                return hit, cfg
            looked.append(f"Hugging Face cache: {repo}/{f}")
        how.append(f"https://huggingface.co/{repo}")
    if cfg.get("url"):
        local = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        looked.append(str(local))
        how.append(cfg["url"])
    for p in looked:
        if os.path.isfile(p):
            return p, cfg
    raise FileNotFoundError(
        f"weights for open_clip {model!r} / {tag!r} are not on this machine (looked for: {'; '.join(looked)}) "
        f"and nothing is downloaded at run time. Download them elsewhere ({' or '.join(how)}) and pass "
        f"`checkpoint: /path/to/open_clip_pytorch_model.bin` (keep `pretrained: {tag}` for its preprocessing).")


def load_clip(model: str, pretrained: str | None = None, checkpoint: str | Path | None = None,
              device: str | torch.device = "cpu") -> LoadedClip:
    """One path for every CLIP: open_clip `model` name with weights from `checkpoint` (a local file;
    `{model}.json` next to it is registered first, which is how the tiny CLIP is found) or from the
    on-disk cache of the `pretrained` tag. With both, the file supplies weights and the tag preprocessing.
    torch.load runs with weights_only=True, so no pickled code from a user's file executes."""
    tag_cfg: dict = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP checkpoint {path} not found. Provide an open_clip weights file for {model!r} there "
                f"(e.g. download open_clip_pytorch_model.bin elsewhere and set `checkpoint: /path/to/it`), "
                f"or train the embedded tiny CLIP into {path.parent}.")
        if (path.parent / f"{model}.json").is_file():
            open_clip.add_model_config(path.parent / f"{model}.json")
        weights = str(path)
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    elif pretrained:
        weights, tag_cfg = _cached_pretrained(model, pretrained)
    else:
        raise ValueError(f"load_clip({model!r}): give `checkpoint` or `pretrained`; a randomly initialised "
                         f"CLIP would make prompt recovery meaningless")
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"open_clip has no model config {model!r}; for a local model put {model}.json (an "
                         f"open_clip model config) next to the checkpoint")
    # a file path as `pretrained` loads through open_clip's load_checkpoint (torch.load weights_only=True,
    # or safetensors); the tag's preprocessing / activation would otherwise be lost with the tag
    clip, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=weights, device=device, weights_only=True,
        image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
        image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"),
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    clip.eval()
    return LoadedClip(clip, open_clip.get_tokenizer(model), preprocess)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      caption_index: torch.Tensor | list[int]) -> dict:
    """Held-out retrieval with text_features one row per *distinct* caption and caption_index[i] the
    row of image i's caption (identical captions are one candidate, so a duplicate is never a miss).
    image->caption top-1/top-5: own caption ranked among all captions; text->image top-1: the best
    image for a caption carries that caption."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    idx = torch.as_tensor(caption_index)
    sim = img @ txt.T  # [images, captions]
    own = sim.gather(1, idx[:, None])
    rank = (sim > own).sum(1)  # ties count in the image's favour
    best_image = sim.argmax(0)  # per caption
    return {"image_to_caption_top1": float((rank < 1).float().mean()),
            "image_to_caption_top5": float((rank < 5).float().mean()),
            "text_to_image_top1": float((idx[best_image] == torch.arange(len(txt))).float().mean()),
            "n_images": int(len(img)), "n_captions": int(len(txt))}


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, images: np.ndarray, captions: list[str], batch_size: int = 256) -> dict:
    model.eval()
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    img_f = torch.cat([model.encode_image(normalise_images(images[i:i + batch_size], model))
                       for i in range(0, len(images), batch_size)])
    txt_f = torch.cat([model.encode_text(tokenizer(distinct[i:i + batch_size]))
                       for i in range(0, len(distinct), batch_size)])
    return retrieval_metrics(img_f, txt_f, [row[c] for c in captions])


class _UsedRows(torch.nn.Module):
    """The token embedding during training, cut to the rows the training captions use (about 40 of 49,408):
    those rows get exactly the gradients and AdamW steps they would get in the full matrix, and the other rows,
    which no caption reaches, are not carried through every backward pass and optimizer step (that dense
    6.3M-parameter update was a third of a training step). `merged()` writes the rows back."""

    def __init__(self, embedding: torch.nn.Embedding, used: torch.Tensor):
        super().__init__()
        self.full, self.used = embedding, used
        lookup = torch.zeros(embedding.num_embeddings, dtype=torch.long)
        lookup[used] = torch.arange(len(used))
        self.register_buffer("lookup", lookup, persistent=False)
        self.rows = torch.nn.Parameter(embedding.weight.detach()[used].clone())
        embedding.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.lookup[ids], self.rows)

    def merged(self) -> torch.nn.Embedding:
        with torch.no_grad():
            self.full.weight[self.used] = self.rows
        self.full.weight.requires_grad_(True)
        return self.full


def _contrastive_loss(img_f, txt_f, logit_scale, caption_ids):
    """Symmetric InfoNCE; pairs with the same caption text are all positives (soft targets), because
    repeated captions ("a small red circle") in one batch are not negatives of each other."""
    logits = logit_scale * F.normalize(img_f, dim=-1) @ F.normalize(txt_f, dim=-1).T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_tiny_clip(data_dir: str | Path, out_dir: str | Path, epochs: int = 6, batch_size: int = 128,
                    lr: float = 2e-3, seed: int = 0, threads: int = 1, progress: bool = True,
                    weight_decay: float = 0.1, warmup_frac: float = 0.05, max_steps: int | None = None,
                    config: dict | None = None, trained_on: str | None = None, train_config: dict | None = None) -> dict:
    """Train the tiny CLIP on data_dir's train split (shapes.write_split) and evaluate retrieval on
    val + test together; returns the metrics dict (also clip_metrics.json). A train split smaller than one batch
    trains with batches of its size (never 0 steps: a random CLIP would make every prompt meaningless);
    `trained_on` says in the reports what it learnt from, `train_config` (data.clip.train) is what the
    preparation step's cache compares."""
    t0 = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    model = build_tiny_clip(out, config)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    images, _, captions = load_split(data_dir, "train")
    if len(images) < 2 or any(c is None for c in captions):
        raise ValueError(f"{data_dir}: the tiny CLIP needs at least 2 captioned training images, got {len(images)}"
                         f"{' (some without a caption)' if len(images) >= 2 else ''}")
    batch_size = min(int(batch_size), len(images))  # a set smaller than one batch: one batch of all of it
    tokens = tokenizer(captions)
    distinct = {c: i for i, c in enumerate(sorted(set(captions)))}
    caption_ids = torch.tensor([distinct[c] for c in captions])
    model.token_embedding = _UsedRows(model.token_embedding, torch.unique(tokens))

    # open_clip's own split: no weight decay on gains, biases and the temperature
    no_decay = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in params if not no_decay(n, p)],
                              "weight_decay": weight_decay}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(images) // batch_size  # drop the ragged last batch: InfoNCE wants full batches
    total = min(epochs * steps_per_epoch, max_steps or 10**12)
    if total < 1:  # epochs or max_steps of 0: the checks upstream refuse them; never save an untrained CLIP
        raise ValueError(f"the tiny CLIP would train 0 steps (epochs {epochs}, {len(images)} images, batch {batch_size})")
    warmup = max(1, int(warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="tiny CLIP", disable=not progress, mininterval=2.0)
    step, loss_value, epoch = 0, float("nan"), 0
    model.train()
    while step < total:
        perm = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * batch_size:(b + 1) * batch_size]
            img_f, txt_f, scale = model(normalise_images(images[idx.numpy()], model), tokens[idx])
            loss = _contrastive_loss(img_f, txt_f, scale, caption_ids[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # as open_clip's training: temperature at most 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            loss_value = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        epoch += 1
    bar.close()
    model.token_embedding = model.token_embedding.merged()
    train_s = time.time() - t0

    save_checkpoint(model, out, epoch, config)
    # id 0 is only padding here (SimpleTokenizer pads with 0, the "!" token, which no caption uses)
    (out / "clip_vocab.json").write_text(json.dumps(sorted(set(tokens[tokens != 0].tolist()))))
    held_images, held_captions = [], []
    for split in ("val", "test"):
        im, _, caps = load_split(data_dir, split)
        held_images.append(im)
        held_captions += caps
    retrieval = evaluate_retrieval(model, tokenizer, np.concatenate(held_images), held_captions)
    data_meta = json.loads((Path(data_dir) / "meta.json").read_text())
    metrics = {"model": TINY_CLIP_NAME, "checkpoint": CHECKPOINT_NAME, "retrieval_val_test": retrieval,
               "parameters": sum(p.numel() for p in model.parameters()), "steps": step, "epochs": epoch,
               "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
               "final_train_loss": loss_value, "logit_scale": model.logit_scale.exp().item(),
               "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
               "data_fingerprint": data_meta["fingerprint"], "trained_on": trained_on,
               "train_config": train_config}
    # the tiny CLIP's completion marker (the `clip` preparation step and the searches look for it): atomic, so a killed job
    # never leaves half of one that reads as a trained model
    atomic_write_text(out / "clip_metrics.json", json.dumps(metrics, indent=2))
    return metrics
