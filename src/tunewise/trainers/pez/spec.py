"""The pez trainer's declarative side: name, metric, knobs, default config, checks and search space.

Torch-free (numpy at most), so that validating a config at the Snakefile parse and the light jobs that read
a trainer's knobs never import torch or open_clip; trainer.py adds the search on top.
"""
from __future__ import annotations

import copy
from pathlib import Path

from tunewise.trainers.base import Capabilities, check_data_source
from tunewise.trainers.pez import TINY_CLIP_NAME, TINY_IMAGE_SIZE, diagnosis, folder, shapes

CLIP_DIR = "clip"  # under the prepared data directory: the embedded tiny CLIP
SHAPES_DIR = "shapes"  # under it too: the generated shapes a tiny CLIP learns from when the user's images have no captions
CAPTION_METRIC = "val/caption_ratio"  # the prompts' similarity as a share of the captions' (images with captions)
SIMILARITY_METRIC = "val/similarity"  # the prompts' similarity itself (images without captions)
PROMPTS_FILE = "prompts.json"  # per target: caption, prompt, similarities, token recovery
TARGETS_DIR = "targets"  # the target images as PNG, for the reports
TEST_PROMPTS_FILE = "prompts_test.json"  # evaluate_test's prompts, in the final folder

DEFAULT_DATA = {
    # embedded: generated shapes | path: a folder of images (folder.py) or a folder written by shapes.write_split
    "source": "embedded",
    "path": None,
    "captions": None,  # a folder of images' captions file (relative to it); None: captions.csv / captions.json if there
    "image_size": TINY_IMAGE_SIZE,  # a folder's images are centre-cropped to this square (the tiny CLIP's 64)
    "held_out": 0.2,  # share of a captioned folder kept from the tiny CLIP's training: the images PEZ searches
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
        "min_delta": 0.0,  # patience counts an evaluation as an improvement only above this gain in similarity
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


def layout(data: dict) -> str:
    """embedded (generated shapes), arrays (a user's folder with meta.json and .npy arrays) or images (a folder
    of images, made into arrays by prepare_data)."""
    if data["source"] != "path":
        return "embedded"
    return "arrays" if (Path(data["path"]) / "meta.json").is_file() else "images"


def has_captions(data: dict) -> bool:
    """Whether the targets have captions (the caption ratio needs them). Torch-free and reads no image, so the
    primary metric follows the data at resolve time."""
    if layout(data) != "images":
        return True
    return folder.find_captions(data["path"], data.get("captions")) is not None


def own_clip(data: dict) -> bool:
    """Whether data.clip names weights of the user's (no tiny CLIP is trained then)."""
    return bool(data["clip"].get("checkpoint") or data["clip"].get("pretrained"))


def images_root(config: dict) -> Path:
    """Where the targets' arrays are: a user's arrays folder as it is, else what prepare_data wrote."""
    data = config["data"]
    if layout(data) == "arrays":
        return Path(data["path"])
    if not data.get("prepared_dir"):
        raise ValueError("data.prepared_dir: not set (prepare the data first)")
    return Path(data["prepared_dir"])


def clip_data_root(config: dict) -> Path:
    """What the tiny CLIP trains on: the targets' own folder when it has captions, else the generated shapes
    prepare_data wrote beside it (a CLIP must learn from captions, and the user's images have none)."""
    if has_captions(config["data"]):
        return images_root(config)
    return Path(config["data"]["prepared_dir"]) / SHAPES_DIR


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
    primary_metric = CAPTION_METRIC  # SIMILARITY_METRIC for images without captions: primary_metric_for
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
    # For the same reason its loss rises in the second half of a healthy search as often as not (26% of its range
    # above its minimum at the end at lr 0.1, 200 steps, on the embedded data), so a rising loss counts from half
    # its range. Its own rules (prompt churn and freeze, pez/diagnosis.py) bring their thresholds.
    diagnosis_thresholds = {"loss_jitter_rel": 1.0, "still_improving_frac": 0.05, "rising_frac": 0.5,
                            **diagnosis.THRESHOLDS}
    report_sections = ("tunewise.trainers.pez.report:prompt_section",)

    def extra_findings(self, history, metrics: dict, thresholds: dict) -> list[dict]:
        return diagnosis.prompt_findings(history, metrics, thresholds)

    def recommendation_patterns(self) -> dict:
        return {"lr_too_low": diagnosis.lr_too_low}

    def primary_metric_for(self, config: dict) -> str:
        """The caption ratio needs captions: a folder of images without them is measured by the prompts'
        similarity to their image (an experiment's metric.name defaults to this at resolve time)."""
        return CAPTION_METRIC if has_captions(config["data"]) else SIMILARITY_METRIC

    def metric_names(self, config: dict) -> list[str]:
        """What a run's history rows hold (checked against metric.name at validation): the caption measures only
        where the images have captions."""
        val = ["similarity", "random_similarity", "random_best_similarity"]
        if has_captions(config["data"]):
            val += ["caption_ratio", "caption_similarity"]
        return [f"val/{n}" for n in val] + ["train/loss", "train/similarity", "train/token_change", "train/prompt_churn"]


    def preparation_steps(self, config: dict) -> dict[str, str]:
        """Without weights of its own (data.clip.checkpoint/pretrained), a run uses the embedded tiny CLIP,
        trained once per experiment before any search: on the captioned images, or on the generated shapes."""
        if own_clip(config["data"]):
            return {}
        if layout(config["data"]) == "images":
            on = "the captioned images" if has_captions(config["data"]) else "the generated shapes (the images have no captions)"
            return {CLIP_DIR: f"train the embedded tiny CLIP on {on}"}
        return {CLIP_DIR: "train the embedded tiny CLIP on the prepared shapes"}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    # --- config ---------------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        from tunewise.trainers.pez.options import PezConfig

        data = config["data"]
        check_data_source(data)
        if data["source"] == "path":
            folder.check_folder(data["path"])
        if layout(data) == "arrays":
            try:
                shapes.read_meta(data["path"])  # a damaged meta.json stops the workflow here, not in a job
            except ValueError as e:
                raise ValueError(f"data.path: {e}") from None
        elif layout(data) == "images":
            self._check_images_config(data)
        generator_config(data)
        if int(data["n_targets"]) < 1:
            raise ValueError(f"data.n_targets: must be >= 1, got {data['n_targets']}")
        clip = data["clip"]
        if clip.get("checkpoint") and Path(clip["checkpoint"]).is_dir():
            raise ValueError(f"data.clip.checkpoint: {clip['checkpoint']} is a directory; name the weights file in "
                             f"it (e.g. open_clip_pytorch_model.bin)")
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

    @staticmethod
    def _check_images_config(data: dict) -> None:
        """A folder of images: its captions file named or found, and sizes the CLIP can see (the images
        themselves are read and checked by prepare_data, not at every parse)."""
        folder.find_captions(data["path"], data.get("captions"))
        if not 0 < float(data["held_out"]) < 1:
            raise ValueError(f"data.held_out: a share of the images between 0 and 1, got {data['held_out']}")
        if int(data["image_size"]) < folder.MIN_SIDE:
            raise ValueError(f"data.image_size: must be >= {folder.MIN_SIDE}, got {data['image_size']}")
        if not own_clip(data) and int(data["image_size"]) != TINY_IMAGE_SIZE:
            raise ValueError(f"data.image_size: the tiny CLIP sees {TINY_IMAGE_SIZE} px images, got "
                             f"{data['image_size']}; keep {TINY_IMAGE_SIZE}, or give a CLIP of your own (data.clip)")

    def search_space(self) -> dict:
        return {
            "pez.lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
            "pez.weight_decay": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
            "pez.prompt_len": {"type": "int", "low": 4, "high": 12},
            "pez.prompt_bs": {"type": "categorical", "choices": [1, 2, 4]},
        }
