"""Small TextCaps folders in the two layouts a user brings, written from the trainer's own generator: the
original JSON (TextCaps_0.1_{split}.json + image files + Rosetta OCR records) and the Hugging Face parquet layout
(lmms-lab/TextCaps: data/{split}-00000-of-00001.parquet, one row per image with the image bytes inside, no OCR).
The generator's own `tunewise` tags are stripped: real TextCaps has no groups."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tunewise.trainers.textcaps.data import SPLITS, annotation_name, generate, ocr_name

# ten classes (the generator's): 30 train images give 3 per class, val and test 20 each; 32 px keeps it cheap
TINY = {"n_train": 30, "n_val": 20, "n_test": 20, "image_size": 32, "seed": 3, "captions_per_image": 2}
MISSING_IMAGE = "train/0000000000missing.jpg"  # one caption entry of the JSON fixture whose image is not there


def _generated(cache: Path) -> Path:
    src = cache / "generated"
    if not (src / "meta.json").exists():
        generate(src, TINY)
    return src


def _entries(src: Path, split: str) -> list[dict]:
    entries = json.loads((src / annotation_name(split)).read_text())["data"]
    for e in entries:
        e.pop("tunewise", None)
    return entries


def write_json_layout(root: Path, cache: Path) -> Path:
    """TextCaps JSON + PNG files + OCR, plus one train caption whose image file is missing."""
    src = _generated(cache)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        entries = _entries(src, split)
        if split == "train":
            ghost = dict(entries[0], image_id="0000000000missing", image_path=MISSING_IMAGE,
                         image_name="0000000000missing", caption_id=len(entries))
            entries.append(ghost)
        doc = {"dataset_type": split, "dataset_name": "textcaps", "dataset_version": "0.1", "data": entries}
        (root / annotation_name(split)).write_text(json.dumps(doc))
        shutil.copyfile(src / ocr_name(split), root / ocr_name(split))
        shutil.copytree(src / split, root / split, dirs_exist_ok=True)
    return root


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet_layout(root: Path, cache: Path) -> Path:
    """lmms-lab/TextCaps' columns, one row per image, the PNG bytes inside; no OCR files."""
    src = _generated(cache)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows: dict[str, dict] = {}
        for e in _entries(src, split):
            row = rows.get(e["image_id"])
            if row is None:
                row = rows[e["image_id"]] = {
                    "question_id": e["image_id"], "question": "Please carefully observe the image and come up with "
                    "a caption for the image.",
                    "image": {"bytes": (src / e["image_path"]).read_bytes(), "path": None},
                    **{k: e[k] for k in ("image_id", "image_classes", "flickr_original_url", "flickr_300k_url",
                                         "image_width", "image_height", "set_name", "image_name", "image_path")},
                    "caption_id": [], "caption_str": [], "reference_strs": list(e["reference_strs"]),
                }
            row["caption_id"].append(e["caption_id"])
            row["caption_str"].append(e["caption_str"])
        columns = {k: [r[k] for r in rows.values()] for k in next(iter(rows.values()))}
        table = pa.table({k: pa.array(v, type=HF_IMAGE) if k == "image" else v for k, v in columns.items()})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root
