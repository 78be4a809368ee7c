"""Synthetic captioned images for the embedded tiny CLIP: coloured shapes with sizes, relations and
counts ("a small red circle above a large blue square", "three small green triangles").

Why synthetic: no CLIP weights ship in any package and nothing may download at run time, so the
embedded default trains its own CLIP; ground-truth captions then make PEZ prompt recovery measurable.

Files written by `write_split(out_dir, ...)` under out_dir:
  {split}_images.npy   uint8 [N, size, size, 3]
  {split}_captions.json  {"<image id>": caption}, ids "{split}-{index:06d}" in array order
  {split}_scenes.json    {"<image id>": [{shape, colour, size, cx, cy, r}, ...]}  (what was drawn)
  meta.json              generator config, counts, fingerprint (written last: its presence marks a
                         complete directory)
The same layout is what a user's data.path may hold instead of a folder of images (the .npy files are read with
allow_pickle=False, and checked at prepare-data: `folder.check_arrays`), and what `folder.prepare_folder` makes
of a folder of images ({split}_captions.json then maps ids to null when the images have no captions).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunewise.runs import atomic_write_text, read_user_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.12, "large": 0.20}  # radius as a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    counts: dict[str, int] = field(default_factory=lambda: {"train": 8000, "val": 500, "test": 200})
    # scene kinds and their probabilities: one object, two related objects, several equal objects
    p_single: float = 0.2
    p_relation: float = 0.55
    p_count: float = 0.25
    seed: int = 0


def fingerprint(cfg: ShapesConfig) -> str:
    """Stable hash of everything that determines the pixels and captions."""
    payload = json.dumps({"cfg": asdict(cfg), "colours": COLOURS, "shapes": SHAPES, "sizes": SIZES,
                          "relations": RELATIONS, "version": 1}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a filled shape centred at (cx, cy) pixels, half-extent r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up: half-width grows linearly from 0 at the top to r at the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = r * 0.35
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _object(rng, size_px: int, box: tuple[float, float, float, float], size_word: str | None = None,
            colour: str | None = None, shape: str | None = None) -> dict:
    """Draw object attributes and a centre inside box = (x0, y0, x1, y1) so the shape fits in it."""
    size_word = size_word or str(rng.choice(list(SIZES)))
    r = SIZES[size_word] * size_px
    x0, y0, x1, y1 = box
    cx = rng.uniform(x0 + r + 1, max(x0 + r + 1, x1 - r - 1))
    cy = rng.uniform(y0 + r + 1, max(y0 + r + 1, y1 - r - 1))
    return {"shape": shape or str(rng.choice(SHAPES)), "colour": colour or str(rng.choice(list(COLOURS))),
            "size": size_word, "cx": round(float(cx), 2), "cy": round(float(cy), 2), "r": round(float(r), 2)}


def _phrase(o: dict) -> str:
    return f"{o['size']} {o['colour']} {o['shape']}"


def _scene(rng, cfg: ShapesConfig) -> tuple[list[dict], str]:
    s = cfg.image_size
    kind = rng.choice(3, p=[cfg.p_single, cfg.p_relation, cfg.p_count])
    if kind == 0:
        o = _object(rng, s, (0, 0, s, s))
        return [o], f"a {_phrase(o)}"
    if kind == 1:
        rel = str(rng.choice(RELATIONS))
        top, bottom, left, right = (0, 0, s, s / 2), (0, s / 2, s, s), (0, 0, s / 2, s), (s / 2, 0, s, s)
        box_a, box_b = {"above": (top, bottom), "below": (bottom, top),
                        "left of": (left, right), "right of": (right, left)}[rel]
        a = _object(rng, s, box_a)
        b = _object(rng, s, box_b)
        while (b["shape"], b["colour"]) == (a["shape"], a["colour"]):  # "a red circle above a red circle" is ambiguous
            b = _object(rng, s, box_b)
        return [a, b], f"a {_phrase(a)} {rel} a {_phrase(b)}"
    n = int(rng.choice(list(COUNT_WORDS)))
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    size_word = "small" if n > 2 else str(rng.choice(list(SIZES)))
    # one object per quadrant cell so equal objects never overlap (and stay countable)
    cells = rng.permutation(4)[:n]
    objs = [_object(rng, s, ((c % 2) * s / 2, (c // 2) * s / 2, (c % 2 + 1) * s / 2, (c // 2 + 1) * s / 2),
                    size_word, colour, shape) for c in cells]
    plural = shape + ("es" if shape.endswith("s") else "s")
    return objs, f"{COUNT_WORDS[n]} {size_word} {colour} {plural}"


def render(objects: list[dict], size: int, background: int) -> np.ndarray:
    img = np.full((size, size, 3), background, dtype=np.uint8)
    for o in objects:
        img[shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size)] = COLOURS[o["colour"]]
    return img


def generate(cfg: ShapesConfig, split: str) -> tuple[np.ndarray, list[str], list[list[dict]]]:
    """Images [N, S, S, 3] uint8, captions and drawn objects of one split; deterministic in (cfg, split)."""
    # one independent stream per split, so changing the train count leaves val/test unchanged
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    n = cfg.counts[split]
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(n):
        objs, caption = _scene(rng, cfg)
        images[i] = render(objs, cfg.image_size, background=int(rng.integers(0, 70)))
        captions.append(caption)
        scenes.append(objs)
    return images, captions, scenes


def write_split(out_dir: str | Path, cfg: ShapesConfig | None = None) -> dict:
    """Generate every split of cfg into out_dir; returns the meta dict (also written as meta.json)."""
    cfg = cfg or ShapesConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in cfg.counts:
        images, captions, scenes = generate(cfg, split)
        ids = [f"{split}-{i:06d}" for i in range(len(captions))]
        np.save(out / f"{split}_images.npy", images)
        atomic_write_text(out / f"{split}_captions.json", json.dumps(dict(zip(ids, captions)), indent=0))
        atomic_write_text(out / f"{split}_scenes.json", json.dumps(dict(zip(ids, scenes))))
    meta = {"generator": "tunewise.pez.shapes", "config": asdict(cfg), "fingerprint": fingerprint(cfg),
            "counts": dict(cfg.counts), "colours": COLOURS, "shapes": list(SHAPES)}
    # last and atomic: a complete meta.json means a complete directory; a job killed mid-write leaves none
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a shapes directory (a user's data.path, or one write_split filled), or an error naming it."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: not a complete shapes directory (written by write_split)")
    meta = read_user_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("counts"), dict):
        raise ValueError(f"{path}: not a shapes meta.json (expected a mapping with `counts` per split)")
    return meta


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, list[str], list[str | None]]:
    """(images uint8 [N, S, S, 3], image ids, captions; None where the images have none) in array order."""
    d = Path(data_dir)
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"{d / 'meta.json'} missing: not a complete shapes directory (write_split)")
    from tunewise.trainers.pez.folder import load_images

    images = load_images(d / f"{split}_images.npy", mmap=False)  # never unpickles; a pickled .npy is named
    captions = read_user_json(d / f"{split}_captions.json")
    ids = list(captions)
    if len(ids) != len(images):
        raise ValueError(f"{d}: {len(images)} images but {len(ids)} captions in split {split!r}")
    return images, ids, [captions[i] for i in ids]
