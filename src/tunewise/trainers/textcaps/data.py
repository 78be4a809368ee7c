"""Data for the `textcaps` trainer: a generator that writes TextCaps-format files, the loaders that
read them (and real TextCaps), the dataset the trainer iterates and a group-stratified batch sampler.

One loader path serves real and generated data: `generate` writes exactly the files a TextCaps user
has, and `load_split` reads either.

Files (real TextCaps / TextVQA, and what `generate` writes under out_dir)
  TextCaps_0.1_{split}.json            {"dataset_type", "dataset_name", "dataset_version", "data": [...]},
                                       one entry per caption: image_id, image_classes, caption_id,
                                       caption_str, reference_strs, image_path, image_name, set_name,
                                       image_width, image_height, flickr_original_url, flickr_300k_url
  TextVQA_Rosetta_OCR_v0.2_{split}.json  {"data": [{image_id, ocr_tokens, ocr_info: [{word, bounding_box:
                                       {top_left_x, top_left_y, width, height, ...}}]}]}, normalised boxes
  {split}/{image_id}.png               the images, at the entries' `image_path`
  meta.json                            generator config, fingerprint, class list, counts (written last)
The Hugging Face copy (lmms-lab/TextCaps) is one parquet row per image with the image bytes inside
(`image: {bytes, path}`, `caption_str` a list); `load_split` reads it too (format: parquet).

Generated-only extras ride in each annotation entry under the key "tunewise" (`group`, `style`);
a TextCaps reader ignores unknown keys, and real TextCaps has none (so spurious mode needs groups
from the generator).

Generator design (why worst-group accuracy is a real problem here)
  Ten classes. Each class c has two core cues, each ambiguous on its own:
  - visual: a drawn object whose shape (and, with prob `colour_keep`, colour) is that of the visual
    pair c // 2, so the object tells {0,1}, {2,3}, ... apart but not the two classes of a pair;
  - text: a word on a sign (rendered with PIL's default font, and in the OCR record) from the word
    set of the text pair c % 5, so it tells {0,5}, {1,6}, ... apart; it is shown with prob
    `text_keep`, replaced by a word of another text pair with prob `text_distractor`, else absent.
  Visual pair x text pair identifies the class, so the image alone or the text alone gets at most
  about half the classes right while both together get most of them (tests check this with a
  nearest-centroid classifier).
  The spurious cue is a background *style*: a background tint plus a brand word on the sign (so it
  shows in the pixels, in the OCR tokens and in the caption). One style per class. In train, style ==
  class for `majority_frac` of each class's images (exactly, per class) and a uniformly drawn other
  style for the rest; in val and test the style is uniform and independent of the class. The style is
  far easier to learn than the core cues (a global tint, or one fixed word, against shape x word
  conjunctions), and in train it alone is right `majority_frac` of the time, so ERM leans on it.
  Groups (the generator's, for `mode: spurious`): "majority" = style agrees with the class, "minority"
  = it does not. In train the minority is 1 - majority_frac of the data and ERM fits it by
  memorising rather than by learning the conjunction; in val/test the minority is 90% of the data and
  ERM's accuracy on it is low. GroupDRO's weights move onto the minority group, whose loss can only
  fall by learning the core cues, which also serve the majority group: worst-group accuracy rises and
  the average barely moves (it rises when the minority dominates val).
  For GroupDRO to act on the shortcut, both spurious groups must be seen through the same encoder (one
  modality, shared weights): the group names a slice of the data, not a feature space.
  `majority_frac: null` draws the style uniformly in every split (no shortcut), for `mode: expand`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, Sampler

from tunewise.runs import atomic_write_text, read_user_json, write_json
from tunewise.trainers.textcaps.data_config import (  # noqa: F401  (re-exported: data.py was their home)
    ALPHABET,
    CAPTION_TEMPLATES,
    CLASSES,
    DEFAULT_GENERATOR,
    DEFAULT_LOADER,
    MIN_IMAGE_SIDE,
    MODES,
    N_CLASSES,
    SPLITS,
    TEXT_SOURCES,
    VOCAB_SIZE,
    annotation_name,
    detect_layout,
    ocr_name,
    parquet_files,
    resolve_generator_config,
    resolve_loader_config,
)

log = logging.getLogger(__name__)

META = "meta.json"
# bump when the generated files change for the same config, so cached datasets are rebuilt
GENERATOR_FORMAT = 1


# --- the synthetic world ------------------------------------------------------------------------

# Open Images labels, as image_classes[0] holds in real TextCaps
SHAPES = ("circle", "square", "triangle", "cross", "ring")  # one per visual pair c // 2
OBJECT_COLOURS = ((215, 40, 40), (40, 70, 215), (25, 150, 55), (235, 135, 15), (135, 45, 175))
TEXT_WORDS = (  # one word set per text pair c % 5
    ("cafe", "coffee", "mocha"),
    ("sale", "deal", "offer"),
    ("bank", "atm", "cash"),
    ("taxi", "cab", "metro"),
    ("hotel", "inn", "motel"),
)
FILLERS = ("the", "new", "st", "no", "24", "co", "ltd", "exit", "main", "open")
# the spurious styles, one per class: a background tint and a brand word
STYLE_NAMES = ("ivory", "mint", "sky", "rose", "sand", "lilac", "slate", "peach", "olive", "teal")
STYLE_TINTS = (
    (250, 246, 228), (200, 240, 215), (195, 222, 250), (248, 205, 215), (232, 214, 170),
    (222, 205, 242), (168, 180, 194), (250, 215, 185), (190, 196, 140), (150, 210, 205),
)
BRANDS = ("acme", "zeta", "nova", "orbit", "pixel", "delta", "lumen", "vista", "polar", "ember")
EXTRA_LABELS = ("Text", "Font", "Signage", "Advertising", "Logo")
GROUP_NAMES = ("majority", "minority")


def visual_pair(c: int) -> int:
    return c // 2


def text_pair(c: int) -> int:
    return c % 5


def fingerprint(cfg: dict) -> str:
    """Hash of everything that shapes the generated files: the resolved config, the generator format,
    Pillow's version (it renders the shapes and the words) and numpy's (its Generator draws every
    choice, and NEP 19 lets distributions change between versions)."""
    import PIL

    key = {
        "config": resolve_generator_config(cfg),
        "format": GENERATOR_FORMAT,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _font(size_px: int):
    try:
        return ImageFont.load_default(size=size_px)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour, bg) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colour)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        h = 0.5 * r
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=bg)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _render(
    rng: np.random.Generator, size: int, cfg: dict, label: int, style: int, font
) -> tuple[np.ndarray, list, dict]:
    """One image: background of the style's tint, the object of the class's visual pair, a sign with
    the words. Returns (HxWx3 uint8, [(word, bbox in pixels)], cue facts)."""
    tint = np.array(STYLE_TINTS[style], dtype=np.float64)
    pixels = tint + rng.normal(0.0, float(cfg["noise"]), size=(size, size, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    # the sign takes the top or bottom third, the object the rest
    sign_h = int(round(size * 0.36))
    sign_top = bool(rng.random() < 0.5)
    obj_y0, obj_y1 = (sign_h, size) if sign_top else (0, size - sign_h)
    pair = visual_pair(label)
    if rng.random() < float(cfg["colour_keep"]):
        colour_idx = pair
    else:
        colour_idx = int(rng.choice([i for i in range(5) if i != pair]))
    r = rng.uniform(0.12, 0.19) * size
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(obj_y0 + r + 1, max(obj_y0 + r + 1, obj_y1 - r - 1))
    bg = tuple(int(v) for v in STYLE_TINTS[style])
    _draw_shape(draw, SHAPES[pair], cx, cy, r, OBJECT_COLOURS[colour_idx], bg)

    # the class word (or a distractor, or none) on line 1; the brand and a filler on line 2
    u = rng.random()
    if u < float(cfg["text_keep"]):
        cue = "keep"
        word = str(rng.choice(TEXT_WORDS[text_pair(label)]))
    elif u < float(cfg["text_keep"]) + float(cfg["text_distractor"]):
        cue = "distractor"
        other = int(rng.choice([p for p in range(5) if p != text_pair(label)]))
        word = str(rng.choice(TEXT_WORDS[other]))
    else:
        cue = "none"
        word = None
    line1 = [word] if word else []
    if rng.random() < 0.5:
        line1.append(str(rng.choice(FILLERS)))
    line2 = [BRANDS[style]] if rng.random() < float(cfg["brand_keep"]) else []
    if rng.random() < 0.3:
        line2.insert(int(rng.integers(0, len(line2) + 1)), str(rng.choice(FILLERS)))

    y0 = 0 if sign_top else size - sign_h
    shade = int(rng.integers(228, 256))
    draw.rectangle((1, y0 + 1, size - 2, y0 + sign_h - 2), fill=(shade, shade, shade))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    words: list[tuple[str, tuple[int, int, int, int]]] = []
    line_h = (sign_h - 2) / 2
    for row, line in enumerate((line1, line2)):
        x = 3 + int(rng.integers(0, max(1, size // 10)))
        y = y0 + 1 + row * line_h
        for w in line:
            left, top, right, bottom = draw.textbbox((x, y), w, font=font)
            if right > size - 2:  # would run off the sign: not drawn, so not read either
                continue
            draw.text((x, y), w, fill=ink, font=font)
            words.append((w, (left, max(0, top), right, min(size, bottom))))
            x = right + max(3, size // 16)
    return np.asarray(image), words, {"text_cue": cue, "colour": colour_idx}


def _image_id(seed: int, split: str, i: int) -> str:
    # 16 hex digits like real TextCaps ids; a function of (seed, split, index) alone
    return hashlib.sha256(f"tunewise-textcaps:{seed}:{split}:{i}".encode()).hexdigest()[:16]


def _styles(rng: np.random.Generator, labels: np.ndarray, majority_frac: float | None, correlated: bool) -> np.ndarray:
    """Per-image style: in a correlated split, exactly round(majority_frac * n_c) images of class c
    (at random) get style c and the rest a uniformly drawn other style; else uniform over all."""
    n = len(labels)
    if majority_frac is None or not correlated:
        return rng.integers(0, N_CLASSES, size=n)
    styles = np.empty(n, dtype=np.int64)
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(float(majority_frac) * len(idx)))
        styles[idx[:k]] = c
        others = rng.integers(0, N_CLASSES - 1, size=len(idx) - k)
        styles[idx[k:]] = others + (others >= c)  # skip c itself
    return styles


def _generate_split(out_dir: Path, split: str, n: int, cfg: dict, font) -> tuple[dict, dict, dict]:
    seed, size = int(cfg["seed"]), int(cfg["image_size"])
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % N_CLASSES)  # balanced classes
    styles = _styles(rng, labels, cfg["majority_frac"], correlated=(split == "train"))
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    entries, ocr_records = [], []
    cue_counts = {"keep": 0, "distractor": 0, "none": 0}
    caption_id = 0
    for i in range(n):
        label, style = int(labels[i]), int(styles[i])
        pixels, words, facts = _render(rng, size, cfg, label, style, font)
        cue_counts[facts["text_cue"]] += 1
        image_id = _image_id(seed, split, i)
        rel = f"{split}/{image_id}.png"
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        (out_dir / rel).write_bytes(buf.getvalue())

        kept = [(w, b) for w, b in words if rng.random() >= float(cfg["ocr_miss"])]
        ocr_records.append({
            "image_id": image_id,
            "ocr_tokens": [w for w, _ in kept],
            "ocr_info": [
                {
                    "word": w,
                    "bounding_box": {
                        "top_left_x": round(b[0] / size, 4),
                        "top_left_y": round(b[1] / size, 4),
                        "width": round((b[2] - b[0]) / size, 4),
                        "height": round((b[3] - b[1]) / size, 4),
                        "rotation": 0, "roll": 0, "pitch": 0, "yaw": 0,
                    },
                }
                for w, b in kept
            ],
        })
        n_extra = int(rng.integers(0, 3))
        extras = [EXTRA_LABELS[j] for j in sorted(rng.choice(len(EXTRA_LABELS), size=n_extra, replace=False))]
        shown = " ".join(w for w, _ in words) or "nothing"
        templates = rng.permutation(len(CAPTION_TEMPLATES))[: int(cfg["captions_per_image"])]
        a_style = ("an " if STYLE_NAMES[style][0] in "aeiou" else "a ") + STYLE_NAMES[style]
        captions = [CAPTION_TEMPLATES[t].format(a_style=a_style, words=shown) for t in templates]
        base = {
            "image_id": image_id,
            "image_classes": [CLASSES[label], *extras],
            "flickr_original_url": f"https://example.invalid/tunewise/{image_id}_o.png",
            "flickr_300k_url": f"https://example.invalid/tunewise/{image_id}_z.png",
            "image_width": size,
            "image_height": size,
            "set_name": split,
            "image_name": image_id,
            "image_path": rel,
        }
        tag = {"group": GROUP_NAMES[0] if style == label else GROUP_NAMES[1], "style": STYLE_NAMES[style]}
        for caption in captions:
            entries.append({
                **base,
                "caption_id": caption_id,
                "caption_str": caption,
                "reference_strs": list(captions),
                "tunewise": tag,
            })
            caption_id += 1
    annotations = {"dataset_type": split, "dataset_name": "textcaps", "dataset_version": "0.1", "data": entries}
    ocr = {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.2", "data": ocr_records}
    aligned = styles == labels
    stats = {
        "n_images": n,
        "n_captions": len(entries),
        "group_counts": {GROUP_NAMES[0]: int(aligned.sum()), GROUP_NAMES[1]: int((~aligned).sum())},
        "majority_share": round(float(aligned.mean()), 4) if n else None,
        "text_cue_counts": cue_counts,
    }
    return annotations, ocr, stats


def _dump(data: Any) -> str:
    # compact, insertion-ordered: byte-identical for the same config
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_meta(out_dir: Path) -> dict | None:
    path = Path(out_dir) / META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def generate(out_dir: Path, cfg: dict | None = None) -> dict:
    """Write the synthetic TextCaps-format dataset under out_dir and return its meta.

    Skipped when out_dir/meta.json carries this config's fingerprint. Otherwise the old meta.json is
    removed first and written last, so a killed run never leaves files that look complete."""
    cfg = resolve_generator_config(cfg)
    out_dir = Path(out_dir)
    digest = fingerprint(cfg)
    meta = read_meta(out_dir)
    if meta is not None and meta.get("fingerprint") == digest and all(
        (out_dir / annotation_name(s)).exists() for s in SPLITS
    ):
        return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).unlink(missing_ok=True)
    for split in SPLITS:  # images of an older config would linger under other ids
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)
    font = _font(max(8, int(round(int(cfg["image_size"]) * 10 / 64))))
    sizes = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}
    split_stats = {}
    for split in SPLITS:
        annotations, ocr, stats = _generate_split(out_dir, split, int(sizes[split]), cfg, font)
        atomic_write_text(out_dir / annotation_name(split), _dump(annotations))
        atomic_write_text(out_dir / ocr_name(split), _dump(ocr))
        split_stats[split] = stats
    meta = {
        "source": "embedded",
        "fingerprint": digest,
        "format": GENERATOR_FORMAT,
        "config": cfg,
        "classes": list(CLASSES),
        "group_names": list(GROUP_NAMES),
        "styles": list(STYLE_NAMES),
        "splits": split_stats,
        "files": [f for s in SPLITS for f in (annotation_name(s), ocr_name(s))],
    }
    write_json(out_dir / META, meta)  # last: its presence with this fingerprint means complete
    return meta


# --- loaders ------------------------------------------------------------------------------------

@dataclass
class Records:
    """One split, one row per image, images decoded once into memory."""

    split: str
    classes: list[str]
    image_ids: list[str]
    labels: np.ndarray  # int64 [n], index into classes
    images: torch.Tensor  # uint8 [n, 3, S, S]
    ocr_tokens: list[list[str]]
    captions: list[list[str]]
    groups: list[str | None]  # the generator's group per image (None for real data)
    summary: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class _Raw:
    """An image's annotations before decoding."""

    image_id: str
    label_name: str
    captions: list[str]
    group: str | None
    image_path: str | None = None  # json layout
    image_bytes: bytes | None = None  # parquet layout
    image_file: str | None = None  # parquet layout: the image struct's path, used when bytes are absent
    ocr: list[str] | None = None


def _new_summary(split: str, source: str, file: str) -> dict:
    return {
        "split": split,
        "format": source,
        "file": file,
        "n_entries": 0,  # caption entries (json) or rows (parquet) read
        "n_images": 0,  # distinct well-formed images
        "n_kept": 0,
        "dropped_class": 0,  # image_classes[0] not among the chosen classes
        "malformed": 0,
        "missing_image": 0,
        "unreadable_image": 0,
        "degenerate_image": 0,  # smaller than MIN_IMAGE_SIDE on a side (1x1 placeholders, tracking pixels)
        "missing_ocr": 0,  # kept images without an OCR record
        "ocr_file": None,  # the OCR file read; None when there is none
        "ocr_records": 0,
        "ocr_unmatched": 0,  # OCR records whose image_id is no image of the split
        "no_caption": 0,  # kept images without a caption
        "examples": {},  # a few ids/paths per problem, for the log and the report
    }


def _note(summary: dict, kind: str, what: str, limit: int = 5) -> None:
    summary[kind] += 1
    examples = summary["examples"].setdefault(kind, [])
    if len(examples) < limit:
        examples.append(what)


def _entries_of(doc: Any, path: Path) -> list:
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return doc["data"]
    if isinstance(doc, list):
        return doc
    keys = f" with keys {', '.join(map(str, list(doc)[:8]))}" if isinstance(doc, dict) else ""
    raise ValueError(f"{path}: expected a TextCaps file {{'data': [...]}}, got a {type(doc).__name__}{keys}")


def _first_class(entry: dict) -> str | None:
    classes = entry.get("image_classes")
    if isinstance(classes, str):
        return classes or None
    if isinstance(classes, (list, tuple, np.ndarray)) and len(classes) and isinstance(classes[0], str) and classes[0]:
        return classes[0]
    return None


def _as_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [v for v in value if isinstance(v, str)]
    return []


def _group_of(entry: dict) -> str | None:
    tag = entry.get("tunewise")
    return tag.get("group") if isinstance(tag, dict) and isinstance(tag.get("group"), str) else None


def read_ocr(path: Path) -> dict[str, list[str]]:
    """image_id -> OCR tokens from a Rosetta OCR file ({"data": [records]}, a list of records, or a
    mapping keyed by image_id); tokens from `ocr_tokens`, else the words of `ocr_info`."""
    doc = read_user_json(path)
    if isinstance(doc, dict) and not isinstance(doc.get("data"), list):
        items = [{"image_id": k, **v} for k, v in doc.items() if isinstance(v, dict)]
    else:
        items = _entries_of(doc, Path(path))
    out: dict[str, list[str]] = {}
    for rec in items:
        if not isinstance(rec, dict) or not isinstance(rec.get("image_id"), str):
            continue
        tokens = rec.get("ocr_tokens")
        if not isinstance(tokens, list):
            tokens = [i.get("word") for i in rec.get("ocr_info") or [] if isinstance(i, dict)]
        out[rec["image_id"]] = [t for t in tokens if isinstance(t, str)]
    return out


def _detect_format(root: Path, split: str, cfg: dict) -> str:
    return detect_layout(root, split, cfg["format"])


def _parquet(path: Path):
    """pyarrow's ParquetFile, its errors named with the file (pyarrow's own say only 'Parquet magic bytes not
    found in footer')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); download it again") from None


def _parquet_batches(pf, path: Path, columns: list[str], batch_size: int = 256):
    import pyarrow as pa

    try:
        yield from pf.iter_batches(columns=columns, batch_size=batch_size)
    except (pa.ArrowException, OSError) as e:  # a file cut short passes the footer check and fails in a page
        raise ValueError(f"{path}: parquet file cannot be read to the end ({e}); download it again") from None


def _label_counts_json(path: Path) -> dict[str, int]:
    entries = _entries_of(read_user_json(path), path)
    seen: dict[str, str] = {}
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("image_id"), str) and e["image_id"] not in seen:
            name = _first_class(e)
            if name:
                seen[e["image_id"]] = name
    counts: dict[str, int] = {}
    for name in seen.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def _label_counts_parquet(files: list[Path]) -> dict[str, int]:
    seen: dict[str, str] = {}
    for f in files:
        pf = _parquet(f)
        missing = {"image_id", "image_classes"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{f}: parquet lacks column(s) {sorted(missing)} (has {sorted(pf.schema_arrow.names)})")
        for batch in _parquet_batches(pf, f, ["image_id", "image_classes"], 4096):
            ids, labels = batch.column("image_id").to_pylist(), batch.column("image_classes").to_pylist()
            for image_id, classes in zip(ids, labels):
                name = _first_class({"image_classes": classes})
                if isinstance(image_id, str) and name and image_id not in seen:
                    seen[image_id] = name
    counts: dict[str, int] = {}
    for name in seen.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def top_classes(root: Path, cfg: dict | None = None) -> list[str]:
    """The classes of the task: cfg.classes when given, else the num_classes most common
    image_classes[0] over the train split's images (ties by name), most common first."""
    cfg = resolve_loader_config(cfg)
    if cfg["classes"]:
        return [str(c) for c in cfg["classes"]]
    root = Path(root)
    fmt = _detect_format(root, "train", cfg)
    if fmt == "json":
        counts = _label_counts_json(root / annotation_name("train"))
    else:
        counts = _label_counts_parquet(parquet_files(root, "train"))
    if not counts:
        where = root / annotation_name("train") if fmt == "json" else root
        raise ValueError(f"data.path: {where}: no entry of the train split has both image_id and image_classes "
                         "(the class label is image_classes[0])")
    if len(counts) < 2:
        where = root / annotation_name("train") if fmt == "json" else root
        raise ValueError(f"data.path: {where}: every image of the train split has the class {next(iter(counts))!r} "
                         "(image_classes[0]); a classifier needs at least 2 classes")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, _ in ranked[: int(cfg["num_classes"])]]


def _read_json_split(root: Path, split: str, cfg: dict, summary: dict) -> list[_Raw]:
    path = root / annotation_name(split)
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} not found")
    entries = _entries_of(read_user_json(path), path)
    by_id: dict[str, _Raw] = {}
    for k, e in enumerate(entries):
        summary["n_entries"] += 1
        image_id = e.get("image_id") if isinstance(e, dict) else None
        name = _first_class(e) if isinstance(e, dict) else None
        image_path = e.get("image_path") if isinstance(e, dict) else None
        well_formed = isinstance(image_id, str) and image_id and isinstance(image_path, str) and image_path
        if not well_formed or name is None:
            # the example names the missing fields: a file whose every entry lacks one says which in the error
            lacking = [f for f, ok in (("image_id", isinstance(image_id, str) and image_id),
                                       ("image_path", isinstance(image_path, str) and image_path),
                                       ("image_classes", name is not None)) if not ok]
            _note(summary, "malformed", f"{path.name}[{k}]: " + (f"no {', '.join(lacking)}" if isinstance(e, dict)
                                                                  else f"a {type(e).__name__}, not an object"))
            continue
        raw = by_id.get(image_id)
        if raw is None:
            raw = by_id[image_id] = _Raw(image_id, name, [], _group_of(e), image_path=image_path)
        caption = e.get("caption_str")
        if isinstance(caption, str) and caption and caption not in raw.captions:
            raw.captions.append(caption)
    return list(by_id.values())


def _read_parquet_split(root: Path, split: str, cfg: dict, summary: dict, keep: set[str]) -> list[_Raw]:
    """Rows of the parquet layout; image bytes are kept only for rows of a chosen class."""
    files = parquet_files(root, split)
    if not files:
        raise FileNotFoundError(f"data.path: no {split}-*.parquet under {root}")
    out: dict[str, _Raw] = {}
    for f in files:
        pf = _parquet(f)
        names = set(pf.schema_arrow.names)
        missing = {"image_id", "image_classes", "image"} - names
        if missing:
            raise ValueError(f"{f}: parquet lacks column(s) {sorted(missing)} (has {sorted(names)})")
        columns = [c for c in ("image_id", "image_classes", "image", "caption_str", "tunewise") if c in names]
        row = 0
        for batch in _parquet_batches(pf, f, columns):
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for j in range(batch.num_rows):
                summary["n_entries"] += 1
                where = f"{f.name}[{row}]"
                row += 1
                image_id = cols["image_id"][j]
                name = _first_class({"image_classes": cols["image_classes"][j]})
                if not isinstance(image_id, str) or not image_id or name is None:
                    _note(summary, "malformed", where)
                    continue
                captions = _as_strings(cols["caption_str"][j]) if "caption_str" in cols else []
                if image_id in out:  # a caption-level export: one row per caption
                    out[image_id].captions.extend(c for c in captions if c not in out[image_id].captions)
                    continue
                image = cols["image"][j]
                data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
                group = _group_of({"tunewise": cols["tunewise"][j]}) if "tunewise" in cols else None
                raw = _Raw(image_id, name, captions, group, image_path=where)
                # holding every row's bytes would cost the whole split in memory: chosen classes only
                raw.image_bytes = (data or b"") if name in keep else None
                if isinstance(image, dict) and isinstance(image.get("path"), str):
                    raw.image_file = image["path"]
                out[image_id] = raw
    return list(out.values())


def _image_candidates(image_root: Path, raw: _Raw) -> list[Path]:
    rel = Path(raw.image_path)
    # real TextCaps says "train/<id>.jpg" while TextVQA unzips into train_images/ and test_images/
    cands = [image_root / rel, image_root / "images" / rel]
    if rel.parent.name:
        cands.append(image_root / f"{rel.parent.name}_images" / rel.name)
    return cands


class _Degenerate(ValueError):
    """An image too small to be a picture."""


def _decode(source: Path | bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        if min(im.size) < MIN_IMAGE_SIDE:  # read from the header: a 1x1 placeholder is not decoded
            raise _Degenerate(f"{im.size[0]}x{im.size[1]} px")
        im.load()
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_split(root: Path, split: str, cfg: dict | None = None) -> Records:
    """Read one split of TextCaps (JSON + image folder + Rosetta OCR JSON, or the Hugging Face
    parquet layout) into Records. Images are decoded once, resized to image_size and kept as uint8.

    Entries whose image_classes[0] is not a chosen class are dropped and counted; malformed entries,
    missing and unreadable images and images without OCR are counted in `summary` (and logged), never
    replaced by blank tensors. Raises when no image of the split can be read."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    cfg = resolve_loader_config(cfg)
    root = Path(root)
    fmt = _detect_format(root, split, cfg)
    classes = top_classes(root, cfg)
    index = {name: i for i, name in enumerate(classes)}
    size = int(cfg["image_size"])
    if fmt == "json":
        file = str(root / annotation_name(split))
    else:
        file = ", ".join(str(p) for p in parquet_files(root, split))
    summary = _new_summary(split, fmt, file)
    if fmt == "json":
        raws = _read_json_split(root, split, cfg, summary)
    else:
        raws = _read_parquet_split(root, split, cfg, summary, set(classes))
    summary["n_images"] = len(raws)
    chosen = []
    for raw in raws:
        if raw.label_name in index:
            chosen.append(raw)
        else:
            summary["dropped_class"] += 1

    image_root = Path(cfg["image_root"] or root)

    def decode(raw: _Raw) -> tuple[str, np.ndarray | None, str]:
        if fmt == "parquet":
            if not raw.image_bytes and raw.image_file and (image_root / raw.image_file).is_file():
                # a parquet written from local files may hold the path instead of the bytes
                raw.image_bytes = (image_root / raw.image_file).read_bytes()
            if not raw.image_bytes:
                return "missing_image", None, raw.image_path or raw.image_id
            return _decoded(raw.image_bytes, raw.image_path or raw.image_id)
        cands = _image_candidates(image_root, raw)
        path = next((p for p in cands if p.is_file()), None)
        if path is None:
            return "missing_image", None, str(cands[0])
        return _decoded(path, str(path))

    def _decoded(source: Path | bytes, what: str) -> tuple[str, np.ndarray | None, str]:
        try:
            return "ok", _decode(source, size), ""
        except _Degenerate as e:
            return "degenerate_image", None, f"{what} ({e})"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return "unreadable_image", None, what

    threads = max(1, int(cfg["threads"]))
    if threads > 1 and len(chosen) > 64:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(decode, chosen))
    else:
        decoded = [decode(raw) for raw in chosen]
    ok = [i for i, (status, _, _) in enumerate(decoded) if status == "ok"]
    for status, _, what in decoded:
        if status != "ok":
            _note(summary, status, what)
    if chosen and not ok:
        first = decoded[0][2]
        all_missing = summary["missing_image"] == len(chosen)
        # all missing: the images are elsewhere (a FileNotFoundError); else they are there but no pictures
        raise (FileNotFoundError if all_missing else ValueError)(
            f"{file}: none of the {len(chosen)} images of split {split!r} could be read "
            f"({summary['missing_image']} missing, {summary['unreadable_image']} unreadable, "
            f"{summary['degenerate_image']} smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px; e.g. {first})"
            + (f"; check data.image_root (now {image_root})" if summary["missing_image"] else "")
        )
    if not ok:
        malformed = summary["examples"].get("malformed")
        raise ValueError(
            f"{file}: no usable images in split {split!r} for classes {classes} "
            f"({summary['malformed']} malformed entries, {summary['dropped_class']} images of other classes)"
            + (f"; malformed entries, e.g. {'; '.join(malformed[:3])}" if malformed else "")
        )
    images = np.empty((len(ok), size, size, 3), dtype=np.uint8)
    for row, i in enumerate(ok):
        images[row] = decoded[i][1]
    kept = [chosen[i] for i in ok]
    summary["n_kept"] = len(kept)
    ocr = _read_split_ocr(Path(cfg["ocr_dir"] or root) / ocr_name(split), raws, summary)
    for raw in kept:
        raw.ocr = ocr.get(raw.image_id)
        if raw.ocr is None:  # counted among the kept images only: the others are gone anyway
            _note(summary, "missing_ocr", raw.image_id)
        if not raw.captions:
            _note(summary, "no_caption", raw.image_id)
    problems = {k: summary[k] for k in ("malformed", "missing_image", "unreadable_image", "degenerate_image",
                                        "missing_ocr", "ocr_unmatched") if summary[k]}
    if problems:
        log.warning("textcaps data (%s): %s (examples: %s)", split, problems, summary["examples"])
    return Records(
        split=split,
        classes=list(classes),
        image_ids=[r.image_id for r in kept],
        labels=np.array([index[r.label_name] for r in kept], dtype=np.int64),
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        ocr_tokens=[list(r.ocr or []) for r in kept],
        captions=[list(r.captions) for r in kept],
        groups=[r.group for r in kept],
        summary=summary,
    )


def _read_split_ocr(path: Path, raws: list[_Raw], summary: dict) -> dict[str, list[str]]:
    """The split's OCR records (none when the file is absent: the parquet layout has no OCR). Records whose
    image_id is no image of the split are counted: OCR of another split or dataset, read as no OCR at all."""
    if not path.is_file():
        log.warning("textcaps data: %s not found; the %s images have no OCR tokens", path, summary["split"])
        return {}
    ocr = read_ocr(path)
    summary["ocr_file"], summary["ocr_records"] = str(path), len(ocr)
    ids = {raw.image_id for raw in raws}
    for image_id in ocr:
        if image_id not in ids:
            _note(summary, "ocr_unmatched", image_id)
    return ocr


def load_splits(root: Path, cfg: dict | None = None, splits: Sequence[str] = SPLITS) -> dict[str, Records]:
    """load_split for several splits with one class list (the train split's top-k is read once)."""
    cfg = resolve_loader_config(cfg)
    cfg["classes"] = top_classes(root, cfg)
    return {split: load_split(root, split, cfg) for split in splits}


# --- text as character ids ------------------------------------------------------------------------

# id 0 = padding, 1 = a character outside the alphabet (data_config.ALPHABET); text is lower-cased first
_CHAR_IDS = {ch: i + 2 for i, ch in enumerate(ALPHABET)}


def text_of(ocr_tokens: Sequence[str], captions: Sequence[str], source: str) -> str:
    """The text the text encoders read: OCR tokens joined, the first caption, or both."""
    if source not in TEXT_SOURCES:
        raise ValueError(f"text.source: expected one of {TEXT_SOURCES}, got {source!r}")
    ocr = " ".join(ocr_tokens)
    caption = captions[0] if captions else ""
    if source == "ocr":
        return ocr
    if source == "caption":
        return caption
    return f"{ocr} | {caption}" if ocr and caption else ocr or caption


def encode_text(text: str, max_len: int) -> list[int]:
    ids = [_CHAR_IDS.get(ch, 1) for ch in text.lower()[:max_len]]
    return ids + [0] * (max_len - len(ids))


def encode_texts(texts: Sequence[str], max_len: int) -> torch.Tensor:
    """[n, max_len] int64 character ids (0-padded, truncated at max_len)."""
    if int(max_len) < 1:
        raise ValueError(f"text.max_len: must be >= 1, got {max_len}")
    ids = [encode_text(t, int(max_len)) for t in texts]
    return torch.tensor(ids, dtype=torch.int64).reshape(len(texts), int(max_len))


# --- dataset ---------------------------------------------------------------------------------------




class TextCapsDataset(Dataset):
    """Samples of one split: (image uint8 [3, S, S], text ids int64 [L], class, group).

    `expand`: one sample per image per configured group (the same image seen through each
    modality). `spurious`: one sample per image, in the generator's group, matched to the configured
    groups by name. Images and texts are stored once per image and indexed, so expansion costs no
    copies and the hot loop never decodes anything. Works with a plain DataLoader (default collate,
    `batch_sampler=StratifiedGroupSampler(...)`); `batch(indices)` gathers a whole batch with one
    tensor index instead (no DataLoader needed for in-memory data). No `__getitems__` on purpose:
    DataLoader would hand its result to collate_fn, and the default collate would mangle it."""

    def __init__(self, records: Records, groups: Sequence[dict], mode: str = "expand",
                 text_source: str = "ocr", max_len: int = 64):
        if mode not in MODES:
            raise ValueError(f"groups mode: expected one of {MODES}, got {mode!r}")
        if not groups:
            raise ValueError("groups: at least one group is needed")
        names = [str(g.get("name", f"group{i}")) for i, g in enumerate(groups)]
        if len(set(names)) != len(names):
            raise ValueError(f"groups: names must be unique, got {names}")
        self.records = records
        self.mode = mode
        self.group_names = names
        self.group_modalities = [str(g.get("modality", "")) for g in groups]
        self.classes = list(records.classes)
        n = len(records)
        self.images = records.images
        self.texts = encode_texts(
            [text_of(o, c, text_source) for o, c in zip(records.ocr_tokens, records.captions)], max_len
        )
        self.image_labels = torch.as_tensor(records.labels, dtype=torch.int64)
        if mode == "expand":
            self.image_index = torch.arange(n, dtype=torch.int64).repeat(len(names))
            self.groups = torch.arange(len(names), dtype=torch.int64).repeat_interleave(n)
        else:
            missing = sorted({g for g in records.groups if g not in names}, key=str)
            if missing:
                raise ValueError(
                    f"groups: spurious mode puts each image in its generator group, but {missing} "
                    f"{'is' if len(missing) == 1 else 'are'} not among the configured groups {names}"
                    + (" (real TextCaps has no groups; use mode: expand)" if None in missing else "")
                )
            self.image_index = torch.arange(n, dtype=torch.int64)
            self.groups = torch.tensor([names.index(g) for g in records.groups], dtype=torch.int64)
        self.labels = self.image_labels[self.image_index]

    def __len__(self) -> int:
        return int(self.image_index.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        j = int(self.image_index[i])
        return self.images[j], self.texts[j], int(self.image_labels[j]), int(self.groups[i])

    def batch(
        self, indices: Sequence[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch by tensor indexing: (images [B,3,S,S] uint8, texts [B,L], labels [B], groups [B])."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        j = self.image_index[idx]
        return self.images[j], self.texts[j], self.labels[idx], self.groups[idx]

    def group_counts(self) -> list[int]:
        return torch.bincount(self.groups, minlength=len(self.group_names)).tolist()


# --- stratified sampler ----------------------------------------------------------------------------


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers >= floor(shares) summing to total, the leftovers to the largest fractional parts."""
    base = np.floor(shares).astype(np.int64)
    left = int(total - base.sum())
    if left > 0:
        order = np.argsort(-(shares - base), kind="stable")
        base[order[:left]] += 1
    return base


class StratifiedGroupSampler(Sampler[list[int]]):
    """Batches of indices in which every group keeps its share of the data.

    With N samples, n_g in group g and batch size B, every full batch holds floor or ceil of
    m_g / n_full samples of group g, where m_g is n_g less the group's part of the last, partial batch
    (largest-remainder shares of it); that is B * n_g / N within one sample, up to 1 / n_full when
    N is not a multiple of B. Full batches are exactly B long: each group's leftover samples are dealt
    round the batches in one continuous sweep (McNaughton's wrap-around), so no batch gets two
    leftovers of one group and every batch gets the same number. Deterministic for (seed, epoch):
    iterating advances the epoch, `set_epoch` sets it."""

    def __init__(self, groups: Sequence[int] | torch.Tensor | np.ndarray, batch_size: int, seed: int = 0,
                 drop_last: bool = False):
        self.group_ids = np.asarray(torch.as_tensor(groups).cpu().numpy(), dtype=np.int64).reshape(-1)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if self.group_ids.size and self.group_ids.min() < 0:
            raise ValueError("groups: ids must be >= 0")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.members = [np.flatnonzero(self.group_ids == g) for g in range(int(self.group_ids.max(initial=-1)) + 1)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = len(self.group_ids), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        n, b = len(self.group_ids), self.batch_size
        sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        pools = [m[rng.permutation(len(m))] for m in self.members]
        if n == 0:
            return []
        n_full, last = divmod(n, b)
        in_last = _largest_remainder(sizes * (last / n), last) if last else np.zeros_like(sizes)
        counts = np.zeros((len(sizes), n_full), dtype=np.int64)
        if n_full:
            m = sizes - in_last
            counts += (m // n_full)[:, None]
            extra = m % n_full
            pointer = int(rng.integers(0, n_full))
            for g in rng.permutation(len(sizes)):
                for k in range(int(extra[g])):
                    counts[g, (pointer + k) % n_full] += 1
                pointer = (pointer + int(extra[g])) % n_full
        batches: list[list[int]] = []
        taken = np.zeros(len(sizes), dtype=np.int64)
        for j in range(n_full):
            parts = []
            for g in range(len(sizes)):
                parts.append(pools[g][taken[g] : taken[g] + counts[g, j]])
                taken[g] += counts[g, j]
            batch = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            batches.append(batch[rng.permutation(len(batch))].tolist())
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if last and not self.drop_last:
            tail = np.concatenate([pools[g][taken[g] :] for g in range(len(sizes))])
            batches.append(tail[rng.permutation(len(tail))].tolist())
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        return iter(self.plan(epoch))
