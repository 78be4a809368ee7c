"""The `textcaps` trainer (seed 001): GroupDRO over heterogeneous feature spaces with Gaussian latent anchors.

Groups come from `data.groups`. In `mode: expand` a group is a view of every image (visual, text or
combined), each with its own encoder phi_g into one shared latent space. In `mode: spurious` a group is
a slice of the data (the generator's majority / minority), and by default every group goes through ONE
shared encoder (`model.shared_encoder`): with one encoder per slice the model could key on the group
instead of learning the core cues, and GroupDRO would have nothing to fix (measured on the generator).
A shared head psi classifies the latents; Gaussian class anchors are fitted to the per-class batch
moments (squared W2) and kept apart; the per-sample cross-entropy is averaged per group and weighted by
GroupDRO's q. Primary metric: validation worst-group accuracy.

The splits sit in memory as uint8 tensors; a batch is one tensor index (`TextCapsDataset.batch`) of the
stratified sampler's plan, sorted by group on the host so per-group encoders get contiguous slices
whose sizes are known without a device sync.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunewise.runs import CONFUSION_FILE, read_json, write_json
from tunewise.trainers.base import data_root
from tunewise.trainers.textcaps import data as tc_data
from tunewise.trainers.textcaps import data_checks
from tunewise.trainers.textcaps.anchors import GaussianAnchors, anchor_losses, build_head
from tunewise.trainers.textcaps.encoders import backbone_prefixes, build_encoder
from tunewise.trainers.textcaps.groupdro import GroupDRO, group_mean_losses
from tunewise.trainers.textcaps.spec import (  # noqa: F401  (re-exported: trainer.py was their home)
    DEFAULT_CONFIG,
    DEFAULT_DATA,
    TEST_CONFUSION_FILE,
    TextCapsSpec,
    encoder_spec,
    effective_config,
    encoder_spec_errors,
    model_encoder_specs,
)


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> list[list[int]]:
    """Counts [true][predicted] as nested lists (JSON)."""
    cells = labels.long() * n_classes + logits.argmax(1).long()
    return torch.bincount(cells, minlength=n_classes * n_classes).view(n_classes, n_classes).tolist()


def confusion_pairs(matrix: list[list[int]], classes: Sequence[str], top: int = 3) -> tuple[float, list[dict]]:
    """(share of all misclassifications on the `top` most confused class pairs, those pairs as {classes, errors});
    a pair counts both directions. A share of nan without errors."""
    n = len(matrix)
    pairs = sorted(((matrix[i][j] + matrix[j][i], i, j) for i in range(n) for j in range(i + 1, n)), reverse=True)
    errors = sum(count for count, _, _ in pairs)
    if not errors:
        return float("nan"), []
    kept = [p for p in pairs[:top] if p[0] > 0]
    return sum(p[0] for p in kept) / errors, [{"classes": [classes[i], classes[j]], "errors": int(c)} for c, i, j in kept]


def class_separation(z: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """How far apart the classes lie in the latent space: the spread of the class means (between-class scatter,
    its trace, each class weighted by its samples) over the spread within the classes (within-class scatter).
    About 0 when the classes lie on top of each other; nan with fewer than two classes present."""
    z = z.double()
    onehot = torch.nn.functional.one_hot(labels.long(), n_classes).double()
    counts = onehot.sum(0)
    if int((counts > 0).sum()) < 2:
        return float("nan")
    means = (onehot.T @ z) / counts.clamp_min(1)[:, None]
    within = float(((z - means[labels.long()]) ** 2).sum())
    between = float((counts[:, None] * (means - z.mean(0)) ** 2).sum())
    return between / within if within > 0 else float("inf")


def metric_name(text: str) -> str:
    """A class or group name as a metric-name part ("Mobile phone" -> "mobile_phone")."""
    return re.sub(r"[^0-9a-z_.-]+", "_", str(text).lower()).strip("_") or "unnamed"


class TextCapsModel(nn.Module):
    """Encoders (one shared, or one per group), the shared head and the class anchors."""

    def __init__(self, encoders: Sequence[nn.Module], modalities: Sequence[str], head: nn.Module,
                 anchors: GaussianAnchors | None):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.modalities = list(modalities)
        self.head = head
        self.anchors = anchors

    @property
    def shared(self) -> bool:
        return len(self.encoders) == 1

    @staticmethod
    def _inputs(modality: str, images: torch.Tensor, texts: torch.Tensor):
        if modality == "visual":
            return images
        if modality == "text":
            return texts
        return images, texts

    def encode(self, images: torch.Tensor, texts: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Latents [B, d] of a batch sorted by group, `counts` samples per group (host ints)."""
        if self.shared:
            return self.encoders[0](self._inputs(self.modalities[0], images, texts))
        parts, start = [], 0
        for g, n in enumerate(counts):
            if n:
                sl = slice(start, start + n)
                parts.append(self.encoders[g](self._inputs(self.modalities[g], images[sl], texts[sl])))
            start += n
        return torch.cat(parts)

    def forward(self, images, texts, counts):
        z = self.encode(images, texts, counts)
        return z, self.head(z)


def build_model(config: dict, n_classes: int, device=None) -> TextCapsModel:
    m = config["model"]
    latent, dropout = int(m["latent_dim"]), float(m["dropout"])
    channels_last = device is not None and torch.device(device).type == "cuda"
    kw = {"vocab_size": tc_data.VOCAB_SIZE, "max_len": int(config["data"]["max_len"]), "channels_last": channels_last}
    modalities, specs = zip(*model_encoder_specs(config))
    encoders = [build_encoder(spec, latent, dropout, **kw) for spec in specs]
    head = build_head(latent, n_classes, int(m["head_hidden"]), dropout)
    a = config["anchors"]
    anchors = GaussianAnchors(n_classes, latent, float(a["anchor_eps"])) if a["enabled"] else None
    return TextCapsModel(encoders, modalities, head, anchors)


def optim_config(config: dict, model: nn.Module) -> dict:
    """config["optim"] with seed 001's differential learning rates turned into prefix parameter groups."""
    o = copy.deepcopy(config["optim"])
    if o.get("lr_new") is not None:
        o["lr"] = float(o["lr_new"])
    if o.get("lr_backbone") is not None:
        groups = dict(o.get("param_groups") or {})
        for prefix in backbone_prefixes(model):
            groups.setdefault(prefix, {"lr": float(o["lr_backbone"])})
        o["param_groups"] = groups
    return o


def _translate(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in [-shift, shift], edges replicated; float in [0, 1]."""
    b, _, h, w = images.shape
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    d = torch.randint(-shift, shift + 1, (2, b), generator=generator).to(images.device)
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    rows = torch.arange(h, device=images.device)[None, :] + d[0][:, None] + shift  # [B, H]
    cols = torch.arange(w, device=images.device)[None, :] + d[1][:, None] + shift  # [B, W]
    bi = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class _Plan(torch.utils.data.Dataset):
    """One epoch's batches as a dataset of batches, so DataLoader workers can gather them."""

    def __init__(self, dataset: tc_data.TextCapsDataset, batches: list[list[int]]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return sorted_batch(self.dataset, self.batches[i])


def sorted_batch(dataset: tc_data.TextCapsDataset, indices) -> tuple:
    """dataset.batch of the indices sorted by group, plus the per-group counts (host tensor)."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    idx = idx[torch.argsort(dataset.groups[idx], stable=True)]
    images, texts, labels, groups = dataset.batch(idx)
    counts = torch.bincount(groups, minlength=len(dataset.group_names))
    return images, texts, labels, groups, counts


class TextCapsTrainer(TextCapsSpec):
    """The textcaps trainer: TextCapsSpec's settings, and the model, the training and the test evaluation."""

    def check_config(self, config: dict) -> None:
        """TextCapsSpec's checks, then the model built once (cheap, nothing is downloaded), so that what only
        the weights tell (a state dict that does not fit its trunk, a truncated file) fails at data preparation,
        before any training."""
        super().check_config(config)
        with encoder_spec_errors(config), torch.random.fork_rng(devices=[]):  # a check must not move the caller's RNG
            build_model(config, 2)

    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        if data_cfg["source"] == "embedded":
            meta = tc_data.generate(Path(out_dir), data_cfg.get("generator"))
            return {
                "source": "embedded",
                "n_rows": sum(int(s["n_images"]) for s in meta["splits"].values()),
                "fingerprint": meta["fingerprint"],
                "classes": meta["classes"],
                "splits": meta["splits"],
                "data_checks": data_checks.embedded_checks(meta),
            }
        # a real dataset is read where it lies, every split once now: what cannot train is refused here, not in
        # the first training job (which Snakemake would retry)
        return data_checks.prepare_user_data(data_cfg, Path(out_dir), threads)

    # --- data -----------------------------------------------------------------------------------
    def _datasets(self, config: dict, splits: Sequence[str]) -> dict[str, tc_data.TextCapsDataset]:
        data = effective_config(config)["data"]
        records = tc_data.load_splits(data_root(config), data, splits)
        return {
            s: tc_data.TextCapsDataset(r, data["groups"], data["mode"], data["text_source"], int(data["max_len"]))
            for s, r in records.items()
        }

    # --- metrics --------------------------------------------------------------------------------
    @staticmethod
    def _predict(model: TextCapsModel, ds: tc_data.TextCapsDataset, indices: torch.Tensor, device,
                 batch_size: int, latents: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits float [n, C] on host, labels, groups, per-sample CE) in batches, in the index order given; the
        latents [n, d] (host, float) appended to `latents` when given."""
        logits, labels, groups, zs = [], [], [], []
        for i in range(0, len(indices), batch_size):
            images, texts, y, g, counts = sorted_batch(ds, indices[i : i + batch_size])
            z, out = model(images.to(device, non_blocking=True), texts.to(device, non_blocking=True), counts.tolist())
            logits.append(out.float().cpu())
            labels.append(y)
            groups.append(g)
            if latents is not None:
                zs.append(z.float().cpu())
        logits, labels, groups = torch.cat(logits), torch.cat(labels), torch.cat(groups)
        if latents is not None:
            latents.append(torch.cat(zs))
        return logits, labels, groups, F.cross_entropy(logits, labels, reduction="none")

    @staticmethod
    def _split_metrics(prefix: str, logits, labels, groups, losses, group_names, classes, by_group_class: bool) -> dict:
        correct = (logits.argmax(1) == labels).double()
        out = {f"{prefix}/loss": float(losses.mean()), f"{prefix}/acc": float(correct.mean())}
        accs = []
        for g, name in enumerate(group_names):
            mask = groups == g
            value = float(correct[mask].mean()) if mask.any() else float("nan")
            out[f"{prefix}/acc/{metric_name(name)}"] = value
            if mask.any():
                accs.append(value)
        # worst and average over the groups present in the split
        out[f"{prefix}/worst_group_acc"] = min(accs) if accs else float("nan")
        out[f"{prefix}/avg_acc"] = sum(accs) / len(accs) if accs else float("nan")
        for c, cname in enumerate(classes):
            mask = labels == c
            out[f"{prefix}/class_acc/{metric_name(cname)}"] = float(correct[mask].mean()) if mask.any() else float("nan")
        if by_group_class:
            for g, name in enumerate(group_names):
                for c, cname in enumerate(classes):
                    mask = (groups == g) & (labels == c)
                    out[f"{prefix}/acc/{metric_name(name)}/{metric_name(cname)}"] = (
                        float(correct[mask].mean()) if mask.any() else float("nan")
                    )
        return out

    # --- training -------------------------------------------------------------------------------
    def run(self, config: dict, seed: int, run, reporter, device, metric: dict, progress: bool | None = None) -> dict:
        from tunewise.train.loop import fit
        from tunewise.train.seed import epoch_generator, seed_everything

        self.check_config(config)
        seed_everything(seed)
        datasets = self._datasets(config, ("train", "val"))
        train_ds, val_ds = datasets["train"], datasets["val"]
        names, classes = train_ds.group_names, train_ds.classes
        n_groups = len(names)
        model = build_model(config, len(classes), device).to(device)
        tcfg, a, d = config["train"], config["anchors"], config["groupdro"]
        dro = GroupDRO(
            n_groups, eta=float(d["eta"]), gamma=float(d["gamma"]), update_mode=d["update_mode"],
            objective=d["objective"], warmup_epochs=int(d["warmup_epochs"]), adjustment=float(d["adjustment"]),
            group_sizes=train_ds.group_counts() if float(d["adjustment"]) else None,
            enabled=bool(d["enabled"]), device=device,
        )
        last = run.load_checkpoint("last.pt")
        if last is not None and "groupdro" in last:
            dro.load_state_dict(last["groupdro"])  # fit restores the rest; q must continue where it was

        batch_size = int(tcfg["batch_size"])
        sampler = tc_data.StratifiedGroupSampler(train_ds.groups, batch_size, seed=seed)
        steps = len(sampler)
        workers = int(tcfg["workers"])
        pin = torch.device(device).type == "cuda"
        shift = int(round(float(config["data"]["augment"]) * int(train_ds.images.shape[-1])))
        lambda_fit, lambda_sep = float(a["lambda_fit"]), float(a["lambda_sep"])
        use_anchors = model.anchors is not None and (lambda_fit > 0 or lambda_sep > 0)
        sums: dict[str, torch.Tensor] = {}
        state = {"augment_gen": None, "step": None}
        # validation confusion matrix of every epoch (the report shows the best step's); a resumed run keeps
        # the epochs it had
        confusion_path = Path(run.path) / CONFUSION_FILE
        confusions = read_json(confusion_path) if confusion_path.exists() else {}
        confusions.update({"split": "val", "classes": list(classes)})
        confusions.setdefault("steps", {})

        def batches(epoch: int) -> Iterator:
            dro.set_epoch(epoch)
            state["step"] = epoch + 1  # the history step this epoch's evaluation is logged under
            # shifts from a generator of (seed, epoch): a resumed run augments like an uninterrupted one
            state["augment_gen"] = epoch_generator(seed + 7919, epoch)
            plan = sampler.plan(epoch)
            if workers > 0:
                loader = torch.utils.data.DataLoader(
                    _Plan(train_ds, plan), batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                    persistent_workers=False,
                )
                yield from loader
            else:
                for indices in plan:
                    yield sorted_batch(train_ds, indices)

        def step(batch):
            images, texts, y, g, counts = batch
            images = images.to(device, non_blocking=True)
            if shift > 0:
                images = _translate(images, shift, state["augment_gen"])
            texts, y, g = (t.to(device, non_blocking=True) for t in (texts, y, g))
            z, logits = model(images, texts, counts.tolist())
            ce = F.cross_entropy(logits.float(), y, reduction="none")
            per_group, group_counts = group_mean_losses(ce, g, n_groups)
            loss = dro.step(per_group, group_counts)
            parts = {"ce": ce.detach().mean()}
            if use_anchors:
                al = anchor_losses(
                    z, y, model.anchors, model.head, a["sep_method"], int(a["sep_samples_per_class"]), float(a["margin"])
                )
                loss = loss + lambda_fit * al["fit"] + lambda_sep * al["sep"]
                parts.update(anchor_fit=al["fit"].detach(), anchor_sep=al["sep"].detach())
            for k, v in parts.items():  # summed on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + v.double()
            sums["_steps"] = sums.get("_steps", 0.0) + 1.0
            return loss, int(y.shape[0])

        # a fixed subset of train samples (all groups): train metrics for the gap, not every row
        n_eval = min(int(tcfg["eval_train_samples"]), len(train_ds))
        g_eval = torch.Generator().manual_seed(seed)
        eval_sets = {
            "train": (train_ds, torch.randperm(len(train_ds), generator=g_eval)[:n_eval].sort().values),
            "val": (val_ds, torch.arange(len(val_ds))),
        }
        eval_bs = int(tcfg["eval_batch_size"])

        def evaluate() -> dict:
            out = {}
            steps_done = float(sums.pop("_steps", 1.0)) or 1.0
            for k, v in sums.items():
                out[f"train/{k}"] = float(v) / steps_done
            sums.clear()
            for split, (ds, idx) in eval_sets.items():
                latents: list = []
                logits, labels, groups, losses = self._predict(model, ds, idx, device, eval_bs,
                                                               latents if split == "val" else None)
                split_metrics = self._split_metrics(split, logits, labels, groups, losses, names, classes, split == "val")
                if split == "val":
                    # what the textcaps diagnosis reads (spec.py's extra_findings): how far apart the classes lie
                    # in the latent space, and how much of the confusion a few class pairs take
                    matrix = confusion_matrix(logits, labels, len(classes))
                    split_metrics["val/class_sep"] = class_separation(latents[0], labels, len(classes))
                    split_metrics["val/confusion_top_share"] = confusion_pairs(matrix, classes)[0]
                    if state["step"] is not None:
                        confusions["steps"][str(state["step"])] = matrix
                        write_json(confusion_path, confusions)
                if split == "train":
                    # train/loss stays the loop's mean of the optimised objective over the epoch (train mode, every
                    # step); the eval-mode loss of the fixed subset swings with how much the model leans on the
                    # spurious cue, which is not what the loss-curve rules of the diagnosis are about
                    split_metrics["train/eval_loss"] = split_metrics.pop("train/loss")
                out.update(split_metrics)
            out.update({f"q/{metric_name(k.split('/', 1)[1])}": v for k, v in dro.log_values(names).items()})
            out.update(dro.concentration())
            return out

        fit_config = {**config, "optim": optim_config(config, model)}
        result = fit(
            model=model,
            config=fit_config,
            run=run,
            reporter=reporter,
            device=device,
            seed=seed,
            train_batches=batches,
            steps_per_epoch=steps,
            train_step=step,
            evaluate=evaluate,
            primary=metric["name"],
            direction=metric["direction"],
            progress=progress,
            extra_state=lambda: {"groupdro": dro.state_dict()},
        )
        if dro.enabled and 0 < dro.warmup_epochs < int(tcfg["epochs"]):
            # the loss before this step is plain ERM's: the diagnosis judges the loss curve from here
            result.metrics["objective_from_step"] = dro.warmup_epochs + 1
        best = confusions["steps"].get(str(result.metrics.get("best_step")))
        if best is not None:
            # the class pairs behind val/confusion_top_share at the best step, by name (the history has numbers only)
            result.metrics["val_confusion_pairs"] = confusion_pairs(best, classes)[1]
        result.metrics["n_train"] = len(train_ds)
        result.metrics["group_counts"] = dict(zip(names, train_ds.group_counts()))
        result.metrics["data_summary"] = {s: ds.records.summary for s, ds in datasets.items()}
        return result.metrics

    def evaluate_test(self, config: dict, checkpoint: Path, device, out_dir: Path) -> dict:
        """The test split's metrics; its confusion matrix (a table, not a metric) goes to out_dir as
        `confusion_test.json` for the final report."""
        from tunewise.runs import load_checkpoint

        test = self._datasets(config, ("test",))["test"]
        model = build_model(config, len(test.classes), device).to(device)
        model.load_state_dict(load_checkpoint(checkpoint, map_location=device)["model"])
        model.eval()
        with torch.no_grad():
            logits, labels, groups, losses = self._predict(
                model, test, torch.arange(len(test)), device, int(config["train"]["eval_batch_size"])
            )
        out = self._split_metrics("test", logits, labels, groups, losses, test.group_names, test.classes, True)
        out["test/n"] = len(test)
        write_json(Path(out_dir) / TEST_CONFUSION_FILE, {"split": "test", "classes": list(test.classes),
                                                         "matrix": confusion_matrix(logits, labels, len(test.classes))})
        return out
