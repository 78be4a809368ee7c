"""The textcaps trainer's data settings: the generator's and the loader's defaults and checks, the class list,
the text alphabet. Torch-free, so that validating a config does not import torch; data.py reads and writes.
"""
from __future__ import annotations

import copy
from pathlib import Path

from tunewise.paths import path_kind

CLASSES = ("Bottle", "Book", "Car", "Building", "Food", "Clothing", "Person", "Poster", "Mobile phone", "Tree")
N_CLASSES = len(CLASSES)
CAPTION_TEMPLATES = (
    "{a_style} sign that says {words}",
    "a sign with the words {words} on {a_style} background",
    "a picture of {a_style} board reading {words}",
)

DEFAULT_GENERATOR = {
    "seed": 0,
    "n_train": 3000,
    "n_val": 1000,
    "n_test": 1000,
    "image_size": 64,
    # share of each class's train images whose style is the class's own; null: no correlation anywhere
    "majority_frac": 0.9,
    "text_keep": 0.6,  # the class's word is on the sign
    "text_distractor": 0.2,  # a word of another text pair instead (else no class word)
    "colour_keep": 0.7,  # the object has its visual pair's colour (else another one)
    "brand_keep": 1.0,  # the style's brand word is on the sign
    "ocr_miss": 0.05,  # each rendered word is missing from the OCR record
    "noise": 10.0,  # std of per-pixel background noise, in 0..255 units
    "captions_per_image": 2,
}


def resolve_generator_config(cfg: dict | None) -> dict:
    out = copy.deepcopy(DEFAULT_GENERATOR)
    unknown = sorted(set(cfg or {}) - set(out))
    if unknown:
        raise ValueError(f"data.generator: unknown keys {unknown} (known: {sorted(out)})")
    out.update(copy.deepcopy(cfg or {}))
    for key in ("n_train", "n_val", "n_test"):
        if int(out[key]) < 0:
            raise ValueError(f"data.generator.{key}: must be >= 0, got {out[key]}")
        out[key] = int(out[key])
    if int(out["n_train"]) < N_CLASSES:
        raise ValueError(f"data.generator.n_train: need at least {N_CLASSES} (one per class), got {out['n_train']}")
    if int(out["image_size"]) < 32:
        raise ValueError(f"data.generator.image_size: must be >= 32 (the sign needs room), got {out['image_size']}")
    mf = out["majority_frac"]
    if mf is not None and not 0.0 <= float(mf) <= 1.0:
        raise ValueError(f"data.generator.majority_frac: must be in [0, 1] or null, got {mf}")
    for key in ("text_keep", "text_distractor", "colour_keep", "brand_keep", "ocr_miss"):
        if not 0.0 <= float(out[key]) <= 1.0:
            raise ValueError(f"data.generator.{key}: must be in [0, 1], got {out[key]}")
    if float(out["text_keep"]) + float(out["text_distractor"]) > 1.0:
        raise ValueError("data.generator: text_keep + text_distractor must be <= 1")
    if not 1 <= int(out["captions_per_image"]) <= len(CAPTION_TEMPLATES):
        raise ValueError(
            f"data.generator.captions_per_image: must be in 1..{len(CAPTION_TEMPLATES)} (one per caption template), "
            f"got {out['captions_per_image']}"
        )
    return out


DEFAULT_LOADER = {
    "format": "auto",  # auto | json | parquet
    "image_root": None,  # where image_path is relative to (json); default: the data root
    "ocr_dir": None,  # where the Rosetta OCR files are; default: the data root
    "num_classes": 10,  # top-k of image_classes[0] over the train split
    "classes": None,  # an explicit class list instead of the top-k
    "image_size": 64,  # images are resized to image_size x image_size
    "threads": 1,  # image decoding threads
}


def resolve_loader_config(cfg: dict | None) -> dict:
    out = copy.deepcopy(DEFAULT_LOADER)
    # the trainer's data section carries more keys (source, generator, text, ...): take ours only
    out.update({k: copy.deepcopy(v) for k, v in (cfg or {}).items() if k in DEFAULT_LOADER})
    if out["format"] not in ("auto", "json", "parquet"):
        raise ValueError(f"data.format: expected auto, json or parquet, got {out['format']!r}")
    # one class is no classification task: refused here rather than as a traceback inside training
    if int(out["num_classes"]) < 2:
        raise ValueError(f"data.num_classes: must be >= 2 (a classifier needs two classes), got {out['num_classes']}")
    classes = out["classes"]
    if classes is not None and (not isinstance(classes, list) or len({str(c) for c in classes}) < 2):
        raise ValueError(f"data.classes: a list of at least 2 distinct class names (image_classes[0] values), "
                         f"got {classes!r}")
    if int(out["image_size"]) < 8:
        raise ValueError(f"data.image_size: must be >= 8, got {out['image_size']}")
    return out


# text as character ids: 0 = padding, 1 = a character outside the alphabet
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-&/()@#$%*+=|"
VOCAB_SIZE = len(ALPHABET) + 2
TEXT_SOURCES = ("ocr", "caption", "both")  # data.text_source: which text a sample reads
MODES = ("expand", "spurious")  # data.mode: the groups are views of each image, or slices of the data
# data.mode auto: spurious on the generator's data (its majority / minority slices), expand on a user's TextCaps,
# which has no groups; the groups and model.shared_encoder follow the mode unless given
MODE_CHOICES = ("auto", *MODES)
SPURIOUS_GROUPS = ({"name": "majority"}, {"name": "minority"})  # the generator's group names, in this order
EXPAND_GROUPS = (
    {"name": "image", "modality": "visual"},
    {"name": "text", "modality": "text"},
    {"name": "both", "modality": "combined"},
)
SPURIOUS_SHARED_ENCODER = "combined"

# what prepare_data refuses or drops in a user's TextCaps (the smallest data a run can learn and be judged on)
MIN_IMAGE_SIDE = 8  # an image smaller than this on a side is a placeholder (1x1 tracking pixels), not a picture
MIN_TRAIN_PER_CLASS = 2  # train images per class, on average
MIN_EVAL_IMAGES = 4  # val and test images each: fewer make the metrics a coin toss

# --- what a user's TextCaps folder must hold -------------------------------------------------------------

SPLITS = ("train", "val", "test")


def annotation_name(split: str) -> str:
    return f"TextCaps_0.1_{split}.json"


def ocr_name(split: str) -> str:
    return f"TextVQA_Rosetta_OCR_v0.2_{split}.json"


def parquet_files(root: Path, split: str) -> list[Path]:
    """The parquet files of a split. lmms-lab/TextCaps: data/{split}-0000k-of-0000n.parquet; the hub's converted
    copy: default/{split}/0000.parquet; or one {split}.parquet."""
    root = Path(root)
    found = set(root.glob(f"**/{split}-*.parquet")) | set(root.glob(f"**/{split}.parquet"))
    found |= set(root.glob(f"**/{split}/*.parquet"))
    return sorted(found)


def check_folder(path, key: str = "data.path") -> Path:
    """`path` as a folder that can be listed. A symlink loop and a file are named as such: Path.exists() is
    False for a loop, which used to read as 'not found' for a path the user can see."""
    path = Path(path)
    try:
        kind = path_kind(path)
    except OSError as e:
        raise ValueError(f"{key}: {path} cannot be read ({e.strerror})") from None
    if kind in ("missing", "dangling"):
        raise FileNotFoundError(f"{key}: not found: {path}")
    if kind == "loop":
        raise ValueError(f"{key}: {path} is a symlink loop (it resolves to itself); point it at the real folder")
    if kind == "file":
        raise ValueError(f"{key}: {path} is a file, not a folder; point {key} at the folder that holds "
                         f"{annotation_name('train')} (or the parquet files)")
    return path


def detect_layout(root: Path, split: str, fmt: str = "auto") -> str:
    """'json' or 'parquet': how the split is stored under root. Raises FileNotFoundError naming the split's file
    (the folder itself exists: the message says what it lacks)."""
    root = Path(root)
    has_json = (root / annotation_name(split)).is_file()
    if fmt == "json" or (fmt == "auto" and has_json):
        if not has_json:
            raise FileNotFoundError(f"data.path: {root} has no {annotation_name(split)} (data.format is json)")
        return "json"
    if parquet_files(root, split):
        return "parquet"
    if fmt == "parquet":
        raise FileNotFoundError(f"data.path: {root} has no {split}-*.parquet file for split {split!r} "
                                "(data.format is parquet)")
    raise FileNotFoundError(
        f"data.path: {root} has neither {annotation_name(split)} nor a {split}-*.parquet file for split {split!r}; "
        f"a TextCaps folder holds {annotation_name(split)} (with the images and the Rosetta OCR files) or the "
        "Hugging Face parquet files"
    )


def check_layout(path, fmt: str = "auto") -> dict[str, str]:
    """Torch-free and cheap (no file is read): data.path is a folder holding every split, in one layout."""
    root = check_folder(path)
    return {split: detect_layout(root, split, fmt) for split in SPLITS}
