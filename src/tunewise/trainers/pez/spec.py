"""The pez trainer's declarative side: name, metric, knobs, default config, checks and search space.

Torch-free (numpy at most), so that validating a config at the Snakefile parse and the light jobs that read
a trainer's knobs never import torch or open_clip; trainer.py adds the search on top.
"""
from __future__ import annotations

import copy
from pathlib import Path

from tunewise.trainers.base import Capabilities, check_data_source
from tunewise.trainers.pez import TINY_CLIP_NAME, shapes

CLIP_DIR = "clip"  # under the prepared data directory: the embedded tiny CLIP
PROMPTS_FILE = "prompts.json"  # per target: caption, prompt, similarities, token recovery
TARGETS_DIR = "targets"  # the target images as PNG, for the reports
TEST_PROMPTS_FILE = "prompts_test.json"  # evaluate_test's prompts, in the final folder

DEFAULT_DATA = {
    "source": "embedded",  # embedded: generated shapes | path: a directory written by shapes.write_split
    "path": None,
    "generator": {"image_size": 64, "n_train": 8000, "n_val": 500, "n_test": 200, "seed": 0},
    "n_targets": 20,  # images of the split whose prompts a run searches (one search each)
    "clip": {
        "model": TINY_CLIP_NAME,  # an open_clip model name
        "pretrained": None,  # an open_clip pretrained tag whose weights are on disk
        "checkpoint": None,  # a local weights file; with neither, the embedded tiny CLIP (preparation step `clip`)
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


def generator_config(data: dict) -> shapes.ShapesConfig:
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


class PezSpec(Capabilities):
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
    report_sections = ("tunewise.trainers.pez.report:prompt_section",)

    def metric_names(self, config: dict) -> list[str]:
        """What a run writes (checked against metric.name at validation)."""
        val = ["similarity", "caption_ratio", "caption_similarity", "random_similarity", "random_best_similarity",
               "text_ratio", "text_similarity", "random_ratio", "token_recovery"]
        return [f"val/{n}" for n in val] + [f"train/{n}" for n in ("loss", "similarity", "token_change", *val)]

    def preparation_steps(self, config: dict) -> dict[str, str]:
        """Without weights of its own (data.clip.checkpoint/pretrained), a run uses the embedded tiny CLIP,
        trained once per experiment on the prepared train split before any search."""
        clip = config["data"]["clip"]
        if clip.get("checkpoint") or clip.get("pretrained"):
            return {}
        return {CLIP_DIR: "train the embedded tiny CLIP on the prepared shapes"}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    # --- config ---------------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        from tunewise.trainers.pez.options import PezConfig

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
        generator_config(data)
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
