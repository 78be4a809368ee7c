"""The textcaps trainer's prepare_data for a user's TextCaps, and the data-check summary of every preparation.

Each split is read once here as training will read it (the same loader, so the same images are dropped), and
what cannot give a sound run is refused before any training: a ValueError of one line naming the file and the
field (the data phase turns it into exit 2, no traceback). What was dropped or looks doubtful becomes the
`data_checks` summary every trainer's ready.json carries, and the diagnostic report's Data section renders:

    {"rows": {split: images kept}, "dropped": [{count, reason, where, examples}], "warnings": [...], "notes": [...]}

The result is cached in the prepared folder under a key of the settings and of the data files' sizes and times,
so a rerun returns the same summary without decoding every image again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunewise.runs import read_json, write_json
from tunewise.trainers.textcaps import data as tc_data
from tunewise.trainers.textcaps.data_config import (
    MIN_EVAL_IMAGES,
    MIN_IMAGE_SIDE,
    MIN_TRAIN_PER_CLASS,
    SPLITS,
    annotation_name,
    check_folder,
    ocr_name,
    parquet_files,
    resolve_loader_config,
)

CHECKS_FILE = "textcaps_checks.json"
CHECKS_FORMAT = 1  # bump when the checks change, so cached summaries are redone
EXAMPLES = 5

# summary counter -> the reason a dropped item is listed under
DROP_REASONS = {
    "malformed": "entry without image_id, image_path or image_classes",
    "missing_image": "image file missing",
    "unreadable_image": "not a readable image (e.g. a text file named .jpg)",
    "degenerate_image": f"image smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px (e.g. a 1x1 placeholder)",
}


def empty_checks() -> dict:
    return {"rows": {}, "dropped": [], "warnings": [], "notes": []}


def embedded_checks(meta: dict) -> dict:
    """The generator's data: nothing dropped, every split as configured."""
    checks = empty_checks()
    checks["rows"] = {split: int(s["n_images"]) for split, s in meta["splits"].items()}
    checks["notes"].append("generated data (data.source: embedded): every image has its OCR record and captions")
    return checks


# --- a user's TextCaps ------------------------------------------------------------------------------------


def prepare_user_data(data_cfg: dict, out_dir: Path, threads: int) -> dict:
    """Check every split of data.path and return ready.json's description with its `data_checks`; raises
    ValueError (one line) for data that cannot train."""
    try:
        root = check_folder(data_cfg.get("path") or "")
        cfg = resolve_loader_config(data_cfg)
        cfg["threads"] = max(int(cfg["threads"]), int(threads or 1))
        key = _cache_key(root, cfg, data_cfg)
        cached = _cached(Path(out_dir), key)
        if cached is not None:
            return cached
        result = _check(root, cfg, data_cfg)
    except FileNotFoundError as e:
        # the loaders' FileNotFoundErrors name the file; here they are bad input like any other (exit 2)
        raise ValueError(str(e)) from None
    write_json(Path(out_dir) / CHECKS_FILE, {"key": key, "result": result})
    return result


def _check(root: Path, cfg: dict, data_cfg: dict) -> dict:
    # the train split first: its class list is the task, and its errors are the likeliest
    cfg["classes"] = tc_data.top_classes(root, cfg)
    summaries, label_counts = {}, {}
    for split in SPLITS:
        records = tc_data.load_split(root, split, cfg)
        _check_groups(records, data_cfg)
        summaries[split] = records.summary
        label_counts[split] = [int((records.labels == c).sum()) for c in range(len(cfg["classes"]))]
        del records  # the images: training decodes them again, and this job holds one split at a time
    _check_counts(root, cfg["classes"], label_counts, summaries)
    checks = _summarise(root, cfg, data_cfg, summaries, label_counts)
    return {
        "source": "path",
        "path": str(root),
        "format": {split: s["format"] for split, s in summaries.items()},
        "classes": list(cfg["classes"]),
        "n_rows": sum(checks["rows"].values()),
        "splits": {split: _compact(s) for split, s in summaries.items()},
        "data_checks": checks,
    }


def _check_groups(records, data_cfg: dict) -> None:
    """Spurious mode needs the generator's groups, which only generated data carries."""
    if data_cfg.get("mode") != "spurious":
        return
    if any(g is None for g in records.groups):
        raise ValueError(
            f"data.mode: spurious puts each image in its generator group, but {records.summary['file']} has none "
            "(real TextCaps has no groups); use mode: expand, or leave data.mode, data.groups and "
            "model.shared_encoder out (source: path then trains the visual, text and combined views)"
        )


def _check_counts(root: Path, classes: list[str], label_counts: dict, summaries: dict) -> None:
    n = {split: sum(counts) for split, counts in label_counts.items()}
    numbers = ", ".join(f"{split} {n[split]}" for split in SPLITS)
    present = [c for c, k in zip(classes, label_counts["train"]) if k]
    if len(present) < 2:
        raise ValueError(
            f"data.path: {summaries['train']['file']}: the usable train images are all of class "
            f"{present[0] if present else None!r} after dropping unusable ones ({numbers} images kept); "
            "a classifier needs at least 2 classes"
        )
    need = MIN_TRAIN_PER_CLASS * len(classes)
    if n["train"] < need:
        raise ValueError(
            f"data.path: {root}: too few images to train: {numbers} usable images for {len(classes)} classes "
            f"(train needs at least {need}, {MIN_TRAIN_PER_CLASS} per class); add images or lower data.num_classes"
        )
    for split in ("val", "test"):
        if n[split] < MIN_EVAL_IMAGES:
            raise ValueError(
                f"data.path: {summaries[split]['file']}: too few images to evaluate on: {numbers} usable images "
                f"({split} needs at least {MIN_EVAL_IMAGES} of the classes {', '.join(classes)})"
            )


def _summarise(root: Path, cfg: dict, data_cfg: dict, summaries: dict, label_counts: dict) -> dict:
    checks = empty_checks()
    checks["rows"] = {split: int(s["n_kept"]) for split, s in summaries.items()}
    for split, s in summaries.items():
        for kind, reason in DROP_REASONS.items():
            if s[kind]:
                examples = [_short(root, e) for e in s["examples"].get(kind, [])[:EXAMPLES]]
                checks["dropped"].append({"count": int(s[kind]), "reason": reason, "where": s["file"],
                                          "examples": examples})
        # the caption entries (json) or rows (parquet) against the images they describe, and what is left
        unit = "caption entries" if s["format"] == "json" else "parquet rows"
        checks["notes"].append(f"{split}: {s['n_entries']} {unit} of {s['n_images']} images, {s['n_kept']} kept")
        if s["dropped_class"]:
            checks["notes"].append(f"{split}: {s['dropped_class']} images of classes outside the {len(cfg['classes'])} "
                                   "chosen (data.num_classes / data.classes) left out")
    checks["warnings"] += _ocr_warnings(root, cfg, data_cfg, summaries)
    checks["warnings"] += _caption_warnings(data_cfg, summaries)
    for c, name in enumerate(cfg["classes"]):
        if not label_counts["train"][c]:
            checks["warnings"].append(f"class {name!r} has no usable train image: the model cannot learn it")
        missing = [split for split in ("val", "test") if not label_counts[split][c]]
        if missing and label_counts["train"][c]:
            checks["notes"].append(f"class {name!r} has no image in {' or '.join(missing)}: its accuracy there is "
                                   "not measured")
    dropped = sum(d["count"] for d in checks["dropped"])
    if dropped:
        checks["warnings"].append(f"{dropped} unusable images or entries dropped (listed under dropped); training "
                                  f"reads the {sum(checks['rows'].values())} images kept")
    return checks


def _ocr_warnings(root: Path, cfg: dict, data_cfg: dict, summaries: dict) -> list[str]:
    source = data_cfg.get("text_source", "ocr")
    if source == "caption":
        return []  # the text view reads the captions: no OCR needed
    out = []
    ocr_dir = Path(cfg["ocr_dir"] or root)
    without = [split for split, s in summaries.items() if s["ocr_file"] is None]
    if without:
        reads = "is empty" if source == "ocr" else "reads the captions only"
        layout = " (the Hugging Face parquet layout has no OCR files)" if any(
            summaries[s]["format"] == "parquet" for s in without) else ""
        out.append(
            f"no OCR records for {', '.join(without)}: {ocr_dir / ocr_name(without[0])} not found{layout}, so every "
            f"text view of those images {reads}. Set data.ocr_dir to the Rosetta OCR folder (TextVQA_Rosetta_OCR_v0.2_"
            "{train,val,test}.json), or data.text_source: caption to read the captions"
        )
    for split, s in summaries.items():
        if s["ocr_unmatched"]:
            examples = ", ".join(s["examples"].get("ocr_unmatched", [])[:3])
            out.append(f"{s['ocr_file']}: {s['ocr_unmatched']} of {s['ocr_records']} OCR records match no image of "
                       f"the {split} split (e.g. {examples}); is data.ocr_dir the OCR of these images?")
        if s["ocr_file"] is not None and s["missing_ocr"]:
            out.append(f"{split}: {s['missing_ocr']} of {s['n_kept']} images have no record in {s['ocr_file']} "
                       "(their OCR text is empty)")
    return out


def _caption_warnings(data_cfg: dict, summaries: dict) -> list[str]:
    source = data_cfg.get("text_source", "ocr")
    if source == "ocr":
        return []
    out = []
    for split, s in summaries.items():
        if s["no_caption"]:
            # TextCaps' own test split has no captions
            out.append(f"{split}: {s['no_caption']} of {s['n_kept']} images have no caption (caption_str), so "
                       f"their text view {'is empty' if source == 'caption' else 'reads the OCR only'} "
                       f"(data.text_source: {source})")
    return out


def _short(root: Path, example: str) -> str:
    """An example path relative to the data folder: the report names the file, not the whole path."""
    try:
        return str(Path(example).relative_to(root))
    except ValueError:
        return example


def _compact(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "examples"}


# --- the cache ---------------------------------------------------------------------------------------------


def _data_files(root: Path, cfg: dict) -> list[Path]:
    files = []
    for split in SPLITS:
        files += [root / annotation_name(split), Path(cfg["ocr_dir"] or root) / ocr_name(split)]
        files += parquet_files(root, split)
    return [f for f in files if f.is_file()]


def _cache_key(root: Path, cfg: dict, data_cfg: dict) -> str:
    # the image files are not listed (there may be 28k): a changed image folder under unchanged annotations needs
    # the prepared folder removed to be checked again
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _data_files(root, cfg)]
    key = {
        "format": CHECKS_FORMAT,
        "root": str(root.resolve()),
        "loader": {k: v for k, v in cfg.items() if k != "threads"},
        "mode": data_cfg.get("mode"),
        "text_source": data_cfg.get("text_source"),
        "files": stats,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(out_dir: Path, key: str) -> dict | None:
    path = out_dir / CHECKS_FILE
    try:
        stored = read_json(path)
    except (OSError, ValueError):
        return None
    return stored["result"] if isinstance(stored, dict) and stored.get("key") == key else None
