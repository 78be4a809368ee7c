"""The `pez` trainer (seed 000): hard-prompt discovery with PEZ against an open_clip CLIP.

A run searches one prompt per target image (all searches as one batch, pez.optimize_prompts) for the first
`data.n_targets` images of the validation split and reports, every `train.report_every` PEZ steps, the PEZ loss,
the current and best similarity, and the primary metric `val/caption_ratio`: the best prompt's similarity as a
share of the ground-truth caption's similarity, averaged over the targets (the ceiling on generated data).
`evaluate_test` runs the same search on the test split's targets, which no tuning has seen.

Embedded default: the shapes images of `shapes.py` and the tiny CLIP the workflow trains on them
(its preparation step `clip`: rule `prepare_step`); the projection then searches the tokens that CLIP was trained on
(`clip_vocab.json`), since its other embedding rows never received a gradient. Any open_clip model with a
pretrained tag on disk or a local checkpoint file works through `data.clip`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunewise.trainers.base import NonFiniteLoss
from tunewise.trainers.pez import folder, shapes
from tunewise.trainers.pez import CHECKPOINT_NAME, TINY_CLIP_NAME
from tunewise.trainers.pez.spec import (  # noqa: F401  (re-exported: trainer.py was their home)
    CLIP_DIR,
    DEFAULT_CONFIG,
    DEFAULT_DATA,
    PROMPTS_FILE,
    SHAPES_DIR,
    SIMILARITY_METRIC,
    TARGETS_DIR,
    TEST_PROMPTS_FILE,
    PezSpec,
    clip_data_root,
    generator_config,
    has_captions,
    images_root,
    layout,
    own_clip,
    tiny_clip_dir,
)


def _checks(rows: dict, dropped=(), warnings=(), notes=()) -> dict:
    """ready.json's data_checks (every list present, possibly empty): what the diagnostic report's Data shows."""
    return {"rows": rows, "dropped": list(dropped), "warnings": list(warnings), "notes": list(notes)}


class PezTrainer(PezSpec):
    """The pez trainer: PezSpec's settings, and the data, the prompt searches and the test evaluation."""

    # --- data -----------------------------------------------------------------------------------
    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        """Embedded: the shapes generated into out_dir. A folder of images: made into arrays in out_dir
        (folder.prepare_folder), plus the shapes a tiny CLIP learns from when the images have no captions. A
        user's arrays folder: checked as training will read it. Each returns its `data_checks`."""
        kind = layout(data_cfg)
        if own_clip(data_cfg):
            self._check_own_clip(data_cfg["clip"])
        if kind == "arrays":
            return self._prepare_arrays(data_cfg)
        if kind == "embedded":
            meta = self._generate_shapes(data_cfg, Path(out_dir))
            counts = meta["counts"]
            checks = _checks({"images": sum(counts.values()), "clip_train": counts["train"],
                              "held_out": counts["val"] + counts["test"]},
                             notes=[f"generated shapes (seed {meta['config']['seed']}): {counts}"])
            return {"source": "embedded", "n_rows": sum(counts.values()), "counts": counts,
                    "fingerprint": meta["fingerprint"], "data_checks": checks}
        return self._prepare_images(data_cfg, Path(out_dir))

    @staticmethod
    def _check_own_clip(clip: dict) -> None:
        """The user's CLIP loads (model name known to open_clip or {model}.json beside the weights, weights that
        fit it), here and not in the first training job."""
        import pickle

        from tunewise.trainers.pez.clip import load_clip

        try:
            load_clip(clip["model"], clip.get("pretrained"), clip.get("checkpoint"), "cpu")
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:  # misfit or damaged weights
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"data.clip: open_clip model {clip['model']!r} does not load from "
                             f"{clip.get('checkpoint') or clip.get('pretrained')} ({first})") from None

    @staticmethod
    def _generate_shapes(data_cfg: dict, out: Path) -> dict:
        """The generated shapes in out (cached: the same generator settings leave a complete directory alone,
        meta.json being written last)."""
        cfg = generator_config(data_cfg)
        meta_path = out / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is None or meta.get("fingerprint") != shapes.fingerprint(cfg):
            meta_path.unlink(missing_ok=True)
            meta = shapes.write_split(out, cfg)
        return meta

    def _prepare_arrays(self, data_cfg: dict) -> dict:
        meta = shapes.read_meta(data_cfg["path"])
        splits = ("val", "test") if own_clip(data_cfg) else ("train", "val", "test")
        counts = folder.check_arrays(data_cfg["path"], meta, splits)
        held = counts["val"] + counts["test"]
        checks = _checks({"images": sum(counts.values()), "clip_train": counts.get("train", 0), "held_out": held},
                         notes=[f"arrays folder (meta.json + .npy): {counts}"])
        return {"source": "path", "layout": "arrays", "path": str(data_cfg["path"]), "counts": counts,
                "n_rows": sum(counts.values()), "fingerprint": meta.get("fingerprint"), "data_checks": checks}

    def _prepare_images(self, data_cfg: dict, out: Path) -> dict:
        captioned = has_captions(data_cfg)
        tiny = not own_clip(data_cfg)
        ready = folder.prepare_folder(data_cfg, out, train_clip=tiny, n_targets=int(data_cfg["n_targets"]),
                                      batch_size=int(data_cfg["clip"]["train"]["batch_size"]))
        ready = json.loads(json.dumps(ready))  # a copy: the cached one in meta.json stays as prepared
        checks = ready["data_checks"]
        if not captioned:
            checks["warnings"].insert(0, f"no captions: the metric is the prompts' similarity to their image "
                                         f"({SIMILARITY_METRIC}); the caption ratio is unavailable (add captions.csv "
                                         f"with columns file,caption for it)")
        if not captioned and tiny:
            # a CLIP learns from captions: without any, the tiny CLIP learns the generated shapes instead
            meta = self._generate_shapes(data_cfg, out / SHAPES_DIR)
            checks["rows"]["clip_shapes"] = meta["counts"]["train"]
            checks["warnings"].insert(1, f"no captions and no CLIP of your own: the tiny CLIP is trained on "
                                         f"{meta['counts']['train']} generated images of coloured shapes and knows "
                                         f"only shapes; for other images give data.clip: {{model: ..., checkpoint: "
                                         f"/path/to/weights}}")
        return ready

    def prepare_step(self, step: str, config: dict, out_dir: Path, threads: int) -> dict | None:
        """The `clip` step: the embedded tiny CLIP, trained on the prepared shapes into out_dir (where the
        searches look: `tiny_clip_dir`). Cached on the data's fingerprint and the training settings: None when
        the one in place fits."""
        from tunewise.trainers.pez.clip import train_tiny_clip

        if step != CLIP_DIR:
            return super().prepare_step(step, config, out_dir, threads)
        out_dir = Path(out_dir)
        if tiny_clip_dir(config) is None:
            raise ValueError("data.clip names its own weights: there is no tiny CLIP to train")
        if out_dir.resolve() != tiny_clip_dir(config).resolve():
            raise ValueError(f"the tiny CLIP belongs in {tiny_clip_dir(config)} (where the searches look), not {out_dir}")
        data_dir = clip_data_root(config)  # the captioned images (prepared or the user's arrays), or the shapes
        train = config["data"]["clip"]["train"]
        fingerprint = shapes.read_meta(data_dir)["fingerprint"]
        done = out_dir / "clip_metrics.json"
        if done.exists():
            old = json.loads(done.read_text())
            if old.get("data_fingerprint") == fingerprint and old.get("train_config") == train:
                return None
            done.unlink()  # clip_metrics.json is written last: without it the directory is incomplete
        trained_on = ("the generated shapes (the images have no captions)" if data_dir.name == SHAPES_DIR
                      and layout(config["data"]) == "images" else None)
        metrics = train_tiny_clip(data_dir, out_dir, epochs=int(train["epochs"]), batch_size=int(train["batch_size"]),
                                  lr=float(train["lr"]), seed=int(train["seed"]), threads=threads,
                                  trained_on=trained_on, train_config=train)
        r = metrics["retrieval_val_test"]
        return {
            "params": {"clip." + k: v for k, v in train.items()} | {"parameters": metrics["parameters"]},
            "metrics": {f"clip/{k}": v for k, v in r.items()} | {"clip/train_seconds": metrics["train_seconds"],
                                                                  "clip/final_train_loss": metrics["final_train_loss"]},
            "files": [done],
            "message": (f"tiny CLIP: {metrics['parameters'] / 1e6:.1f}M parameters, {metrics['steps']} steps of "
                        f"{metrics['batch_size']}, {metrics['train_seconds']:.0f} s; "
                        f"held-out image->caption top-1 {r['image_to_caption_top1']:.3f}, top-5 "
                        f"{r['image_to_caption_top5']:.3f} ({r['n_images']} images)"),
        }

    def _targets(self, config: dict, split: str) -> tuple[np.ndarray, list[str], list[str] | None, list[str] | None]:
        """(images, ids, captions or None without captions, the files they came from or None) of the first
        data.n_targets images of split."""
        root = images_root(config)
        images, ids, captions = shapes.load_split(root, split)
        if not len(ids):
            raise ValueError(f"{root}: split {split!r} has no images to search prompts for (prepare the data again)")
        n = min(int(config["data"]["n_targets"]), len(ids))
        files_path = root / f"{split}_files.json"
        files = json.loads(files_path.read_text()) if files_path.is_file() else None
        captioned = shapes.read_meta(root).get("captioned", True)  # as prepared (the arrays layouts: always)
        return (images[:n], ids[:n], captions[:n] if captioned else None,
                [files[i] for i in ids[:n]] if files else None)

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
                                    f"(the workflow's preparation step `clip` makes it: rule prepare_step; or set data.clip.checkpoint)")
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
        images, ids, captions, files = self._targets(config, split)
        feats = self._image_features(model, images, device)  # [G, dim]
        caption_sim = None  # images without captions: no ceiling, the similarity itself is the measure
        if captions is not None:
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
        caption_mean = sum(caption_sim) / len(caption_sim) if caption_sim else None

        every = int(config["train"]["report_every"])
        n_groups = len(ids)
        best = [-math.inf] * n_groups  # over restarts
        window = {"loss": [], "current": [], "token_change": [], "grad_norm": []}
        rows: list[dict] = []
        t0 = time.perf_counter()
        last_t = t0
        logged_ids = None  # the prompts at the last history row (churn: how many tokens moved since)
        logged_restart = 0  # a restart starts from new random prompts: no churn across its first row

        def on_eval(row: dict) -> None:
            nonlocal last_t, logged_ids, logged_restart
            current = row.get("current_each", [row["current"]])
            for g, b in enumerate(row.get("best_each", [row["best"]])):
                best[g] = max(best[g], b)
            window["loss"].append(row["loss"])
            window["current"].append(sum(current) / n_groups)
            for key in ("token_change", "grad_norm"):
                if key in row:
                    window[key].append(row[key])
            step = row["restart"] * cfg.iter + row["step"] + 1
            if step % every and step != cfg.iter * cfg.restarts:
                return
            now = time.perf_counter()
            out = {
                "step": step,
                "train/loss": sum(window["loss"]) / len(window["loss"]),
                "train/similarity": sum(window["current"]) / len(window["current"]),
                f"{split}/similarity": sum(best) / n_groups,
            }
            if caption_sim is not None:
                out[f"{split}/caption_ratio"] = sum(b / c for b, c in zip(best, caption_sim)) / n_groups
                out[f"{split}/caption_similarity"] = caption_mean
            out |= {
                f"{split}/random_similarity": random_mean,
                f"{split}/random_best_similarity": random_best,
                "lr": cfg.lr,
                "seconds": now - last_t,
                "steps_per_s": len(window["loss"]) / max(now - last_t, 1e-9),
            }
            if window["token_change"]:
                out["train/token_change"] = sum(window["token_change"]) / len(window["token_change"])
            if window["grad_norm"]:  # mean over the window's steps of the searches' mean prompt-gradient norm
                out["grad_norm"] = sum(window["grad_norm"]) / len(window["grad_norm"])
            if row.get("ids") is not None:
                # share of all searches' prompt tokens that differ from the previous row's (none on a first row:
                # nothing logged before it, or a restart's new random start)
                ids = row["ids"]
                if logged_ids is not None and logged_ids.shape == ids.shape and row["restart"] == logged_restart:
                    out["train/prompt_churn"] = float((ids != logged_ids).float().mean())
                logged_ids = ids.clone()
                logged_restart = row["restart"]
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
            c = caption_sim[g] if caption_sim is not None else None
            targets.append({
                "image_id": ids[g], "caption": captions[g] if captions is not None else None, "prompt": res.prompt,
                "similarity": res.similarity, "text_similarity": res.text_similarity,
                "caption_similarity": c, "ratio": res.similarity / c if c else None,
                "text_ratio": res.text_similarity / c if c else None,
                "token_recovery": token_recovery(res.prompt, captions[g]) if captions is not None else None,
                "random_similarity": float(random_scores[:, g].mean()),
                "random_best_similarity": float(random_scores[:, g].max()),
                "restart": res.restart, "ids": res.ids,
                **({"file": files[g]} if files else {}),
            })
        mean = lambda key: sum(t[key] for t in targets) / len(targets)  # noqa: E731
        summary = {
            f"{split}/similarity": mean("similarity"), f"{split}/text_similarity": mean("text_similarity"),
            f"{split}/random_similarity": random_mean, f"{split}/random_best_similarity": random_best,
            f"{split}/n": n_groups,
        }
        if caption_sim is not None:
            recovery = [t["token_recovery"] for t in targets if not math.isnan(t["token_recovery"])]
            summary |= {
                f"{split}/caption_ratio": mean("ratio"), f"{split}/text_ratio": mean("text_ratio"),
                f"{split}/caption_similarity": caption_mean,
                f"{split}/random_ratio": sum(float(random_scores[:, g].mean()) / caption_sim[g]
                                             for g in range(n_groups)) / n_groups,
                f"{split}/token_recovery": sum(recovery) / len(recovery) if recovery else float("nan"),
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
        if metric["name"].endswith("caption_ratio") and not has_captions(config["data"]):
            # before any search: the metric needs captions these images do not have
            raise ValueError(f"metric.name: {metric['name']} needs captions and {config['data']['path']} has none; "
                             f"use {SIMILARITY_METRIC} (the default for images without captions)")
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

    def evaluate_test(self, config: dict, checkpoint: Path, device, out_dir: Path) -> dict:
        """The chosen config's PEZ search on the test split's targets (seed 0): prompts for images no tuning saw,
        written to out_dir as `prompts_test.json` with the test images (targets_test/) for the final report."""
        out = self._search(config, 0, "test", device)
        self._write_targets(Path(out_dir) / TEST_PROMPTS_FILE, Path(out_dir) / "targets_test", out["images"],
                            out["targets"], "test")
        return {k: v for k, v in out["summary"].items() if isinstance(v, (int, float))}
