"""The `pez` trainer (seed 000): hard-prompt discovery with PEZ against an open_clip CLIP.

A run searches one prompt per target image (all searches as one batch, pez.optimize_prompts) for the first
`data.n_targets` images of the validation split and reports, every `train.report_every` PEZ steps, the PEZ loss,
the current and best similarity, and the primary metric `val/caption_ratio`: the best prompt's similarity as a
share of the ground-truth caption's similarity, averaged over the targets (the ceiling on generated data).
`evaluate_test` runs the same search on the test split's targets, which no tuning has seen.

Embedded default: the shapes images of `shapes.py` and the tiny CLIP the workflow trains on them
(`tunewise train-clip`, rule `train_clip`); the projection then searches the tokens that CLIP was trained on
(`clip_vocab.json`), since its other embedding rows never received a gradient. Any open_clip model with a
pretrained tag on disk or a local checkpoint file works through `data.clip`.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunewise.trainers.base import NonFiniteLoss, check_data_source, data_root
from tunewise.trainers.pez import shapes
from tunewise.trainers.pez import CHECKPOINT_NAME, TINY_CLIP_NAME

CLIP_DIR = "clip"  # under the prepared data directory: the embedded tiny CLIP
PROMPTS_FILE = "prompts.json"  # per target: caption, prompt, similarities, token recovery
TARGETS_DIR = "targets"  # the target images as PNG, for the reports

DEFAULT_DATA = {
    "source": "embedded",  # embedded: generated shapes | path: a directory written by shapes.write_split
    "path": None,
    "generator": {"image_size": 64, "n_train": 8000, "n_val": 500, "n_test": 200, "seed": 0},
    "n_targets": 20,  # images of the split whose prompts a run searches (one search each)
    "clip": {
        "model": TINY_CLIP_NAME,  # an open_clip model name
        "pretrained": None,  # an open_clip pretrained tag whose weights are on disk
        "checkpoint": None,  # a local weights file; with neither, the embedded tiny CLIP (rule train_clip)
        "train": {"epochs": 6, "batch_size": 128, "lr": 2e-3, "seed": 0},  # the tiny CLIP's own training
    },
}

DEFAULT_CONFIG = {
    "data": DEFAULT_DATA,
    # the reference's options (methods.md); iter is the budget, prompt_len the capacity
    "pez": {
        "lr": 0.1,
        "weight_decay": 0.1,
        "prompt_len": 8,
        "iter": 300,
        "prompt_bs": 1,
        "batch_size": None,
        "loss_weight": 1.0,
        "blocklist": [],
        "exclude_special": True,
        "exclude_non_ascii": False,
        "patience": None,
        "restarts": 1,
        "amp": "auto",
    },
    "train": {"report_every": 5, "random_prompts": 64},
}


def _generator_config(data: dict) -> shapes.ShapesConfig:
    g = {**DEFAULT_DATA["generator"], **(data.get("generator") or {})}
    unknown = set(g) - set(DEFAULT_DATA["generator"])
    if unknown:
        raise ValueError(f"data.generator: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULT_DATA['generator'])}")
    for key in ("n_train", "n_val", "n_test", "image_size"):
        if int(g[key]) < 1:
            raise ValueError(f"data.generator.{key}: must be >= 1, got {g[key]}")
    return shapes.ShapesConfig(image_size=int(g["image_size"]), seed=int(g["seed"]),
                               counts={"train": int(g["n_train"]), "val": int(g["n_val"]), "test": int(g["n_test"])})


def tiny_clip_dir(config: dict) -> Path | None:
    """Where the embedded tiny CLIP lives, or None when data.clip names another model's weights."""
    c = config["data"]["clip"]
    if c.get("checkpoint") or c.get("pretrained"):
        return None
    if not config["data"].get("prepared_dir"):
        raise ValueError("data.prepared_dir: not set (prepare the data first)")
    return Path(config["data"]["prepared_dir"]) / CLIP_DIR


class PezTrainer:
    name = "pez"
    primary_metric = "val/caption_ratio"
    direction = "max"
    knobs = {
        "lr": "pez.lr",
        "weight_decay": "pez.weight_decay",
        "epochs": "pez.iter",  # the budget: PEZ steps (history steps count them too)
        "batch_size": "pez.batch_size",
        "capacity": ["pez.prompt_len"],
        "patience": "pez.patience",
        "prompt_len": "pez.prompt_len",
        "prompt_bs": "pez.prompt_bs",
        "restarts": "pez.restarts",
    }
    open_config_keys = {"data.generator"}
    # PEZ's loss is measured at the projected (hard) prompts: it jumps whenever a token flips, at every learning
    # rate (second-half step-to-step std 12-16% of its range at lr 0.1 and at 1.0 on the embedded data, both of
    # which reach 99% of the captions' similarity), so an oscillating loss says nothing about the step size here.
    # Its best-so-far similarity makes most of its gain in the first steps (the first matching words), so a search
    # that is far from done still gains only 5-7% of its total in the last quarter (lr 0.003, 60 steps: 0.86 ->
    # 0.93 of the captions' similarity while the first steps gained 0.9): still improving from 5% on.
    diagnosis_thresholds = {"loss_jitter_rel": 1.0, "still_improving_frac": 0.05}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    # --- config ---------------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        from tunewise.trainers.pez.pez import PezConfig

        data = config["data"]
        check_data_source(data)
        if data["source"] == "path":
            if not (Path(data["path"]) / "meta.json").is_file():
                raise FileNotFoundError(f"data.path: {data['path']} has no meta.json (a directory written by "
                                        f"tunewise.trainers.pez.shapes.write_split is expected)")
            try:
                shapes.read_meta(data["path"])  # a damaged meta.json stops the workflow here, not in a job
            except ValueError as e:
                raise ValueError(f"data.path: {e}") from None
        _generator_config(data)
        if int(data["n_targets"]) < 1:
            raise ValueError(f"data.n_targets: must be >= 1, got {data['n_targets']}")
        clip = data["clip"]
        if clip.get("checkpoint") and not Path(clip["checkpoint"]).is_file():
            raise FileNotFoundError(f"data.clip.checkpoint: not found: {clip['checkpoint']}")
        if not clip.get("checkpoint") and not clip.get("pretrained") and clip["model"] != TINY_CLIP_NAME:
            raise ValueError(f"data.clip: model {clip['model']!r} needs `pretrained` (a tag whose weights are on "
                             f"disk) or `checkpoint` (a local file); only {TINY_CLIP_NAME!r} is trained here")
        for key in ("epochs", "batch_size"):
            if int(clip["train"][key]) < 1:
                raise ValueError(f"data.clip.train.{key}: must be >= 1, got {clip['train'][key]}")
        p = dict(config["pez"])
        if float(p["lr"]) <= 0:
            raise ValueError(f"pez.lr: must be > 0, got {p['lr']}")
        if float(p["weight_decay"]) < 0:
            raise ValueError(f"pez.weight_decay: must be >= 0, got {p['weight_decay']}")
        try:
            PezConfig.of(p)
        except (TypeError, ValueError) as e:
            raise ValueError(f"pez: {e}") from None
        if int(config["train"]["report_every"]) < 1:
            raise ValueError(f"train.report_every: must be >= 1, got {config['train']['report_every']}")
        if int(config["train"]["random_prompts"]) < 2:
            raise ValueError(f"train.random_prompts: must be >= 2, got {config['train']['random_prompts']}")

    def search_space(self) -> dict:
        return {
            "pez.lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
            "pez.weight_decay": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
            "pez.prompt_len": {"type": "int", "low": 4, "high": 12},
            "pez.prompt_bs": {"type": "categorical", "choices": [1, 2, 4]},
        }

    # --- data -----------------------------------------------------------------------------------
    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        if data_cfg["source"] == "path":
            meta = shapes.read_meta(data_cfg["path"])
            return {"source": "path", "path": str(data_cfg["path"]), "counts": meta.get("counts"),
                    "n_rows": sum((meta.get("counts") or {}).values())}
        cfg = _generator_config(data_cfg)
        out = Path(out_dir)
        meta_path = out / "meta.json"
        # cached: the same generator settings leave a complete directory alone (meta.json is written last)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is None or meta.get("fingerprint") != shapes.fingerprint(cfg):
            meta_path.unlink(missing_ok=True)
            meta = shapes.write_split(out, cfg)
        return {"source": "embedded", "n_rows": sum(meta["counts"].values()), "counts": meta["counts"],
                "fingerprint": meta["fingerprint"]}

    def _targets(self, config: dict, split: str) -> tuple[np.ndarray, list[str], list[str]]:
        images, ids, captions = shapes.load_split(data_root(config), split)
        n = min(int(config["data"]["n_targets"]), len(ids))
        return images[:n], ids[:n], captions[:n]

    # --- the CLIP -------------------------------------------------------------------------------
    @staticmethod
    def _clip(config: dict, device):
        """(LoadedClip, the token ids the projection may use or None for all)."""
        from tunewise.trainers.pez.clip import load_clip

        c = config["data"]["clip"]
        tiny = tiny_clip_dir(config)
        if tiny is None:
            return load_clip(c["model"], c.get("pretrained"), c.get("checkpoint"), device), None
        if not (tiny / "clip_metrics.json").is_file():
            raise FileNotFoundError(f"the embedded tiny CLIP is not trained: {tiny / 'clip_metrics.json'} is missing "
                                    f"(the workflow's train_clip rule makes it; or set data.clip.checkpoint)")
        loaded = load_clip(TINY_CLIP_NAME, None, tiny / CHECKPOINT_NAME, device)
        return loaded, json.loads((tiny / "clip_vocab.json").read_text())

    @staticmethod
    @torch.no_grad()
    def _image_features(model, images: np.ndarray, device) -> torch.Tensor:
        from tunewise.trainers.pez.clip import normalise_images

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        x = normalise_images(images, model)
        if x.shape[-1] != size:  # a real CLIP sees the shapes at its own resolution
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return F.normalize(model.encode_image(x.to(device)).float(), dim=-1)

    # --- the search ------------------------------------------------------------------------------
    def _search(self, config: dict, seed: int, split: str, device, reporter=None, run=None,
                progress: bool | None = None) -> dict:
        """PEZ for every target of `split`; rows of `split`/... metrics every report_every steps (to the
        reporter and the run's history when given). Returns {"rows", "targets", "summary", "seconds"}."""
        from tunewise.trainers.pez.pez import (PezConfig, Vocabulary, optimize_prompts, random_prompt_scores,
                                               text_tower, token_recovery)

        clip, only_ids = self._clip(config, device)
        model, tokenizer = clip.model, clip.tokenizer
        images, ids, captions = self._targets(config, split)
        feats = self._image_features(model, images, device)  # [G, dim]
        with torch.no_grad():
            caption_feats = F.normalize(model.encode_text(tokenizer(captions).to(device)).float(), dim=-1)
        caption_sim = (caption_feats * feats).sum(-1).tolist()
        p = dict(config["pez"])
        cfg = PezConfig.of({**p, "seed": int(seed), "only_ids": only_ids, "eval_every": 1})
        vocab = Vocabulary(text_tower(model).token_embedding, tokenizer, cfg.blocklist, cfg.exclude_special,
                           cfg.exclude_non_ascii, only_ids)
        # the bar PEZ must clear: random prompts of the same length and vocabulary, the mean and the best of n
        random_scores = random_prompt_scores(model, tokenizer, feats, cfg.prompt_len,
                                             n=int(config["train"]["random_prompts"]), seed=int(seed) + 10_007,
                                             vocabulary=vocab)  # [n, G]
        random_mean = float(random_scores.mean())
        random_best = float(random_scores.max(dim=0).values.mean())
        caption_mean = sum(caption_sim) / len(caption_sim)

        every = int(config["train"]["report_every"])
        n_groups = len(ids)
        best = [-math.inf] * n_groups  # over restarts
        window = {"loss": [], "current": [], "token_change": []}
        rows: list[dict] = []
        t0 = time.perf_counter()
        last_t = t0

        def on_eval(row: dict) -> None:
            nonlocal last_t
            current = row.get("current_each", [row["current"]])
            for g, b in enumerate(row.get("best_each", [row["best"]])):
                best[g] = max(best[g], b)
            window["loss"].append(row["loss"])
            window["current"].append(sum(current) / n_groups)
            if "token_change" in row:
                window["token_change"].append(row["token_change"])
            step = row["restart"] * cfg.iter + row["step"] + 1
            if step % every and step != cfg.iter * cfg.restarts:
                return
            now = time.perf_counter()
            ratios = [b / c for b, c in zip(best, caption_sim)]
            out = {
                "step": step,
                "train/loss": sum(window["loss"]) / len(window["loss"]),
                "train/similarity": sum(window["current"]) / len(window["current"]),
                f"{split}/similarity": sum(best) / n_groups,
                f"{split}/caption_ratio": sum(ratios) / n_groups,
                f"{split}/caption_similarity": caption_mean,
                f"{split}/random_similarity": random_mean,
                f"{split}/random_best_similarity": random_best,
                "lr": cfg.lr,
                "seconds": now - last_t,
                "steps_per_s": len(window["loss"]) / max(now - last_t, 1e-9),
            }
            if window["token_change"]:
                out["train/token_change"] = sum(window["token_change"]) / len(window["token_change"])
            last_t = now
            for v in window.values():
                v.clear()
            rows.append(out)
            if run is not None:
                run.write_history(rows)
            if reporter is not None:
                reporter.epoch(step, out)

        results = optimize_prompts(model, tokenizer, feats, cfg, device, progress=progress, callback=on_eval)
        seconds = time.perf_counter() - t0
        targets = []
        for g, res in enumerate(results):
            targets.append({
                "image_id": ids[g], "caption": captions[g], "prompt": res.prompt,
                "similarity": res.similarity, "text_similarity": res.text_similarity,
                "caption_similarity": caption_sim[g], "ratio": res.similarity / caption_sim[g],
                "text_ratio": res.text_similarity / caption_sim[g],
                "token_recovery": token_recovery(res.prompt, captions[g]),
                "random_similarity": float(random_scores[:, g].mean()),
                "random_best_similarity": float(random_scores[:, g].max()),
                "restart": res.restart, "ids": res.ids,
            })
        recovery = [t["token_recovery"] for t in targets if not math.isnan(t["token_recovery"])]
        mean = lambda key: sum(t[key] for t in targets) / len(targets)  # noqa: E731
        summary = {
            f"{split}/caption_ratio": mean("ratio"), f"{split}/text_ratio": mean("text_ratio"),
            f"{split}/similarity": mean("similarity"), f"{split}/text_similarity": mean("text_similarity"),
            f"{split}/caption_similarity": caption_mean, f"{split}/random_similarity": random_mean,
            f"{split}/random_best_similarity": random_best,
            f"{split}/random_ratio": sum(float(random_scores[:, g].mean()) / caption_sim[g]
                                         for g in range(n_groups)) / n_groups,
            f"{split}/token_recovery": sum(recovery) / len(recovery) if recovery else float("nan"),
            f"{split}/n": n_groups,
        }
        return {"rows": rows, "targets": targets, "summary": summary, "seconds": seconds, "images": images,
                "steps": results[0].steps, "stopped_early": results[0].stopped_early,
                "steps_per_s": results[0].steps_per_s}

    @staticmethod
    def _write_targets(json_path: Path, folder: Path, images: np.ndarray, targets: list[dict], split: str) -> None:
        """The target images as PNGs under folder and the prompts JSON (image paths relative to the JSON's
        folder): the reports show the images next to the prompts."""
        import os

        from PIL import Image

        from tunewise.runs import write_json

        folder.mkdir(parents=True, exist_ok=True)
        for t, image in zip(targets, images):
            path = folder / f"{t['image_id']}.png"
            Image.fromarray(image).save(path)
            t["image"] = Path(os.path.relpath(path, json_path.parent)).as_posix()
        write_json(json_path, {"split": split, "targets": targets})

    # --- training -------------------------------------------------------------------------------
    def run(self, config: dict, seed: int, run, reporter, device, metric: dict, progress: bool | None = None) -> dict:
        from tunewise.train.seed import seed_everything

        self.check_config(config)
        seed_everything(seed)
        # a PEZ run is short and deterministic for its seed: an interrupted one starts again from step 0
        out = self._search(config, seed, "val", device, reporter=reporter, run=run, progress=progress)
        rows, primary = out["rows"], metric["name"]
        if primary not in rows[-1]:
            raise KeyError(f"primary metric {primary!r} is not among the pez trainer's metrics: {sorted(rows[-1])}")
        for row in rows:
            if not math.isfinite(row["train/loss"]):
                raise NonFiniteLoss(row["step"], row["train/loss"])
        higher = metric["direction"] == "max"
        values = [r[primary] for r in rows]
        best_i = max(range(len(rows)), key=lambda i: values[i] if higher else -values[i])
        self._write_targets(Path(run.path) / PROMPTS_FILE, Path(run.path) / TARGETS_DIR, out["images"],
                            out["targets"], "val")
        state = {"prompts": [t["ids"] for t in out["targets"]], "image_ids": [t["image_id"] for t in out["targets"]],
                 "step": rows[-1]["step"], "value": values[-1]}
        # the prompts are the model: best.pt and last.pt hold the ids (best-so-far tracking makes them one)
        run.save_checkpoint("best.pt", state)
        run.save_checkpoint("last.pt", state)
        return {
            "primary": {"name": primary, "direction": metric["direction"], "best": values[best_i], "final": values[-1]},
            "best_step": rows[best_i]["step"],
            "epochs_run": len(rows),
            # in the unit of the history's steps (PEZ steps), like best_step and the budget knob pez.iter
            "epochs_planned": int(config["pez"]["iter"]) * int(config["pez"]["restarts"]),
            "stopped_early": out["stopped_early"],
            "final": rows[-1],
            "best": rows[best_i],
            "pez": out["summary"],
            "wall_seconds": out["seconds"],
            "steps_per_s": out["steps_per_s"],
            "device": str(device),
        }

    def evaluate_test(self, config: dict, checkpoint: Path, device) -> dict:
        """The chosen config's PEZ search on the test split's targets (seed 0): prompts for images no tuning saw.
        The run directory of `checkpoint` gets `prompts_test.json` and the test images (targets_test/); the
        returned "prompts" carry absolute image paths for the final phase's copy."""
        run_dir = Path(checkpoint).parent.parent
        out = self._search(config, 0, "test", device)
        self._write_targets(run_dir / "prompts_test.json", run_dir / "targets_test", out["images"], out["targets"],
                            "test")
        test = {k: v for k, v in out["summary"].items() if isinstance(v, (int, float))}
        test["prompts"] = [{**t, "image": str((run_dir / t["image"]).resolve())} for t in out["targets"]]
        return test
