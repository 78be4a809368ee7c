"""A user's folder of images (with or without captions) made into the arrays layout the pez trainer reads, and
the checks of a user's arrays layout (a folder holding meta.json).

Torch-free (PIL, numpy, pandas), so the config checks at the Snakefile parse can ask `find_captions` whether
an experiment has captions (its primary metric follows) without importing torch.

A folder of images:
  DIR/**/*.png|jpg|jpeg|webp   read recursively (symlinked and hidden folders are not); anything else is skipped
  DIR/captions.csv             optional: columns file,caption (file relative to DIR, e.g. cats/01.jpg), UTF-8
  DIR/captions.json            optional, instead: {"cats/01.jpg": "a cat on a sofa", ...}
`data.captions` names another file (relative to DIR or absolute); with none given the two above are looked up.

What `prepare_folder` writes into the prepared directory (the layout of `shapes.py`, which training reads):
  {split}_images.npy     uint8 [N, size, size, 3], centre-cropped and resized
  {split}_captions.json  {"<id>": caption or null}, ids "{split}-{index:06d}" in array order
  {split}_files.json     {"<id>": the image's path relative to DIR}
  meta.json              counts, whether there are captions, the fingerprint and the data checks (written last)
Splits: `train` (the tiny CLIP trains on it: only with captions and no CLIP of the user's), `val` (the images a
run searches prompts for) and `test` (searched once, at finalize). The split is by a hash of each file's path,
so it does not depend on the order files are listed in and an image keeps its side when others are added.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from tunewise.paths import path_kind

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FILES = ("captions.csv", "captions.json")  # looked up in DIR when data.captions is not given
MIN_SIDE = 8  # pixels: smaller images carry no content a CLIP can see (a 1x1 thumbnail, a tracking pixel)
MIN_CLIP_TRAIN = 8  # captioned images the tiny CLIP needs to learn anything (a contrastive batch of 8)
MIN_HELD_OUT = 2  # one image a run searches a prompt for (val) and one for the final test
EXAMPLES = 5  # file names listed per dropped reason
VERSION = 1  # of the prepared layout: a change re-prepares


# --- the folder --------------------------------------------------------------------------------------------


def find_captions(folder: str | Path, name: str | None) -> Path | None:
    """The captions file of an image folder: `name` (data.captions, relative to the folder or absolute), else
    captions.csv or captions.json in the folder, else None (the images have no captions)."""
    folder = Path(folder)
    if name:
        path = Path(name) if Path(name).is_absolute() else folder / name
        if not path.is_file():
            raise FileNotFoundError(f"data.captions: {path} not found (a CSV with columns file,caption or a JSON "
                                    f"{{file: caption}}; leave data.captions out when the images have no captions)")
        return path
    found = [folder / n for n in CAPTION_FILES if (folder / n).is_file()]
    if len(found) > 1:
        raise ValueError(f"data.path: {folder} holds both {' and '.join(CAPTION_FILES)}; keep one, or name the one "
                         f"to use with data.captions")
    return found[0] if found else None


def check_folder(path: str | Path) -> Path:
    """data.path as a folder pez can read, or an error saying what it is instead."""
    p = Path(path)
    kind = path_kind(p)
    if kind in ("dangling", "loop"):
        raise FileNotFoundError(f"data.path: {p} is a broken symlink or a symlink loop; point it at a folder")
    if kind == "missing":
        raise FileNotFoundError(f"data.path: {p} not found (a folder of images, or a shapes folder with meta.json)")
    if kind == "file":
        raise ValueError(f"data.path: {p} is a file; pez reads a folder of images (png/jpg/jpeg/webp, with an "
                         f"optional captions.csv) or a shapes folder with meta.json: give its folder")
    return p


def list_files(folder: Path, skip: set[Path]) -> tuple[list[str], dict[str, list[str]]]:
    """(image files, {reason: files skipped unread}), as paths relative to folder, sorted; recursive without
    following symlinked folders (a link back up would list the same images forever)."""
    images, skipped = [], {"not an image (by its extension)": [], "a symlinked folder (not followed)": [],
                           "a hidden folder (not read)": []}
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        # .ipynb_checkpoints, .git, .thumbnails: copies and caches, not the user's images (read, they would be twice)
        skipped["a hidden folder (not read)"] += [_rel(base / d, folder) for d in sorted(dirs) if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        skipped["a symlinked folder (not followed)"] += [_rel(base / d, folder) for d in dirs if (base / d).is_symlink()]
        for name in sorted(files):
            path = base / name
            if path in skip:
                continue
            kind = images if path.suffix.lower() in IMAGE_SUFFIXES else skipped["not an image (by its extension)"]
            kind.append(_rel(path, folder))
    return sorted(images), skipped


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def read_image(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [size, size, 3], None), or (None, why it is dropped). Decoded in full here, so a truncated file is
    found now and not in a training job."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, "unreadable or truncated image"
    if min(rgb.size) < MIN_SIDE:
        return None, f"smaller than {MIN_SIDE} px"
    if all(lo == hi for lo, hi in rgb.getextrema()):
        return None, "a single colour"
    # as CLIP's own preprocessing: the shorter side fills the square, the centre is kept
    return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC)), None


# --- captions ----------------------------------------------------------------------------------------------


def read_captions(path: Path) -> tuple[dict[str, str], list[str]]:
    """({file: caption}, warnings) of a captions file; a file that cannot be read as one is refused, named."""
    if path.suffix.lower() == ".csv":
        return _captions_csv(path)
    if path.suffix.lower() == ".json":
        return _captions_json(path), []
    raise ValueError(f"data.captions: {path} is neither .csv (columns file,caption) nor .json ({{file: caption}})")


def _captions_csv(path: Path) -> tuple[dict[str, str], list[str]]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the captions as UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: not a CSV with columns file,caption ({str(e).strip()})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("file", "caption") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {' or '.join(repr(c) for c in missing)} (columns found: "
                         f"{', '.join(table.columns) or 'none'}); a captions CSV has the header file,caption")
    table["file"] = table["file"].map(_key)
    twice = table["file"][table["file"].duplicated()].unique().tolist()
    warnings = [f"{path.name}: {len(twice)} file(s) listed twice, the first caption is used (e.g. "
                f"{', '.join(twice[:EXAMPLES])})"] if twice else []
    table = table.drop_duplicates("file")
    return dict(zip(table["file"], table["caption"].str.strip())), warnings


def _captions_json(path: Path) -> dict[str, str]:
    from tunewise.runs import read_user_json

    data = read_user_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{\"file\": \"caption\", ...}} with text captions, got "
                         f"{type(data).__name__ if not isinstance(data, dict) else 'a non-text caption'}")
    return {_key(k): v.strip() for k, v in data.items()}


def _key(name: str) -> str:
    """A captions file's image name as the folder listing spells it (relative, forward slashes)."""
    return Path(str(name).strip().replace("\\", "/")).as_posix().removeprefix("./")


# --- the preparation ---------------------------------------------------------------------------------------


def fingerprint(folder: Path, images: list[str], captions: Path | None, settings: dict) -> str:
    """What the prepared arrays depend on: each image's path, size and modification time, the captions file's
    bytes and the settings. Cheap (no pixel is read), so a cached preparation is found without reading images."""
    h = hashlib.sha256(json.dumps({"settings": settings, "version": VERSION}, sort_keys=True).encode())
    for rel in images:
        st = (folder / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if captions is not None:
        h.update(captions.read_bytes())
    return h.hexdigest()[:16]


def split_files(files: list[str], held_out: float, train_clip: bool) -> dict[str, list[str]]:
    """{train, val, test} by a hash of each path. With train_clip, `held_out` of the images (at least 2) are kept
    from the tiny CLIP's training; otherwise every image is held out (no CLIP trains on them)."""
    order = sorted(files, key=lambda f: hashlib.sha1(f.encode()).hexdigest())
    n_held = min(len(order), max(MIN_HELD_OUT, round(held_out * len(order)))) if train_clip else len(order)
    held = order[:n_held]
    return {"train": order[n_held:], "val": held[0::2], "test": held[1::2]}


def _dropped(counts: dict[str, list[str]], where: str) -> list[dict]:
    return [{"count": len(files), "reason": reason, "where": where, "examples": files[:EXAMPLES]}
            for reason, files in counts.items() if files]


def _summary(dropped: list[dict]) -> str:
    return "; ".join(f"{d['count']} {d['reason']} (e.g. {', '.join(d['examples'][:3])})" for d in dropped) or "none"


def prepare_folder(data: dict, out_dir: Path, train_clip: bool, n_targets: int, batch_size: int) -> dict:
    """The user's image folder made into out_dir's arrays (cached on the fingerprint); returns ready.json's
    description with its `data_checks`. Refuses (ValueError naming the folder or file) what gives no sound result."""
    folder = check_folder(data["path"])
    captions_path = find_captions(folder, data.get("captions"))
    images, skipped = list_files(folder, {captions_path} if captions_path else set())
    size = int(data["image_size"])
    settings = {"image_size": size, "held_out": float(data["held_out"]), "train_clip": train_clip,
                "n_targets": n_targets, "batch_size": batch_size}
    fp = fingerprint(folder, images, captions_path, settings)
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fp:
            return meta["ready"]  # the same files and settings: the same arrays and the same checks
        meta_path.unlink()  # meta.json marks a complete directory: gone while it is rewritten (or refused)
    return _prepare(folder, captions_path, images, skipped, size, settings, fp, out_dir, n_targets, batch_size)


def _prepare(folder, captions_path, files, skipped, size, settings, fp, out_dir, n_targets, batch_size) -> dict:
    where = str(folder)
    dropped_files: dict[str, list[str]] = {}
    arrays: dict[str, np.ndarray] = {}
    for rel in files:
        image, why = read_image(folder / rel, size)
        if image is None:
            dropped_files.setdefault(why, []).append(rel)
        else:
            arrays[rel] = image
    dropped = _dropped(skipped, where) + _dropped(dropped_files, where)
    if not files and not dropped:
        raise ValueError(f"data.path: {folder} is empty; put the png/jpg/jpeg/webp images there (subfolders count)")
    if not arrays:
        raise ValueError(f"data.path: {folder} has no usable images ({len(files)} image file(s) read; dropped: "
                         f"{_summary(dropped)}); pez needs png/jpg/jpeg/webp images of at least {MIN_SIDE} px")
    warnings, notes = [], []
    captions = None
    if captions_path is not None:
        captions, warnings = _match_captions(captions_path, arrays, dropped, warnings)
    kept = sorted(arrays)
    train_clip = settings["train_clip"] and captions is not None
    splits = split_files(kept, settings["held_out"], train_clip)
    _check_split(folder, splits, train_clip, len(kept))
    notes.append(f"{len(kept)} images, centre-cropped to {size}x{size}; split by a hash of each file's path: "
                 f"{len(splits['train'])} train the tiny CLIP, {len(splits['val'])} are searched by each run (val), "
                 f"{len(splits['test'])} once at finalize (test)")
    if train_clip and len(splits["train"]) < batch_size:
        notes.append(f"the tiny CLIP's training set ({len(splits['train'])} images) is smaller than one batch "
                     f"(data.clip.train.batch_size {batch_size}): it trains with batches of {len(splits['train'])}")
    if len(splits["val"]) < n_targets:  # a note, not a warning: fewer searches per run, each still sound
        notes.append(f"{len(splits['val'])} held-out images for the runs' searches, fewer than data.n_targets "
                        f"({n_targets}): each run searches {len(splits['val'])} prompts")
    counts = _write_splits(out_dir, splits, arrays, captions)
    checks = {
        "rows": {"files": len(files) + sum(len(v) for v in skipped.values()), "images": len(kept),
                 "clip_train": counts["train"], "held_out": counts["val"] + counts["test"], "val": counts["val"],
                 "test": counts["test"], "captions": len(captions) if captions is not None else 0},
        "dropped": dropped, "warnings": warnings, "notes": notes,
    }
    ready = {"source": "path", "layout": "images", "path": where, "captions": str(captions_path) if captions else None,
             "n_rows": len(kept), "counts": counts, "fingerprint": fp, "data_checks": checks}
    meta = {"generator": "tunewise.pez.folder", "source": where, "counts": counts, "captioned": captions is not None,
            "image_size": size, "settings": settings, "fingerprint": fp, "ready": ready}
    from tunewise.runs import atomic_write_text

    # last and atomic: its presence marks a complete directory (shapes.write_split's convention)
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))
    return ready


def _match_captions(path: Path, arrays: dict, dropped: list[dict], warnings: list[str]):
    """The captions of the kept images; images without one are dropped (the caption ratio needs one per image),
    captions naming no image are counted. Refused when no image has one: the file names other files."""
    captions, warnings = read_captions(path)
    warnings = list(warnings)
    unmatched = sorted(set(captions) - set(arrays))
    empty = sorted(f for f in arrays if f in captions and not captions[f])
    without = sorted(f for f in arrays if not captions.get(f))
    if len(without) == len(arrays):
        raise ValueError(f"{path}: names none of the {len(arrays)} images in {path.parent} (e.g. it names "
                         f"{', '.join(unmatched[:3]) or 'nothing'}; the folder has {', '.join(sorted(arrays)[:3])}); "
                         f"the file column holds paths relative to the folder")
    if unmatched:
        warnings.append(f"{path.name}: {len(unmatched)} caption(s) name no image in the folder (e.g. "
                        f"{', '.join(unmatched[:EXAMPLES])})")
    if without:
        warnings.append(f"{len(without)} image(s) have no caption in {path.name} and are left out"
                        + (f" ({len(empty)} with an empty caption)" if empty else ""))
        dropped.append({"count": len(without), "reason": f"no caption in {path.name}", "where": str(path),
                        "examples": without[:EXAMPLES]})
        for f in without:
            del arrays[f]
    return {f: captions[f] for f in arrays}, warnings


def _check_split(folder: Path, splits: dict, train_clip: bool, n: int) -> None:
    if train_clip and len(splits["train"]) < MIN_CLIP_TRAIN:
        raise ValueError(f"data.path: {folder} has {n} usable captioned images, too few to train the tiny CLIP "
                         f"({MIN_CLIP_TRAIN} for its training + {MIN_HELD_OUT} held out); add images, or give a "
                         f"CLIP of your own with data.clip: {{model: ..., checkpoint: /path/to/weights}}")
    if len(splits["test"]) < 1:
        raise ValueError(f"data.path: {folder} has {n} usable image(s): too few held-out images (pez needs "
                         f"{MIN_HELD_OUT}: one a run searches a prompt for, one for the final test); add images")


def _write_splits(out_dir: Path, splits: dict, arrays: dict, captions: dict | None) -> dict[str, int]:
    from tunewise.runs import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, files in splits.items():
        ids = [f"{split}-{i:06d}" for i in range(len(files))]
        stacked = np.stack([arrays[f] for f in files]) if files else np.zeros((0, 1, 1, 3), np.uint8)
        np.save(out_dir / f"{split}_images.npy", stacked)
        atomic_write_text(out_dir / f"{split}_captions.json",
                          json.dumps({i: (captions or {}).get(f) for i, f in zip(ids, files)}, indent=0))
        atomic_write_text(out_dir / f"{split}_files.json", json.dumps(dict(zip(ids, files)), indent=0))
        counts[split] = len(files)
    return counts


# --- a user's arrays layout (meta.json + .npy) -------------------------------------------------------------


def check_arrays(folder: str | Path, meta: dict, splits: tuple[str, ...]) -> dict:
    """The arrays `splits` need, each checked as training will read it: present, a plain uint8 [N, H, W, 3]
    array (never unpickled), as many images as captions and as meta.json's counts. Returns the counts."""
    folder = Path(folder)
    counts = meta.get("counts") or {}
    absent = [s for s in splits if s not in counts]
    if absent:
        raise ValueError(f"{folder / 'meta.json'}: counts has no split {', '.join(absent)} (pez reads train, val "
                         f"and test: {{\"counts\": {{\"train\": N, \"val\": N, \"test\": N}}}})")
    out = {}
    for split in splits:
        images = load_images(folder / f"{split}_images.npy")
        captions_file = folder / f"{split}_captions.json"
        if not captions_file.is_file():
            raise ValueError(f"{captions_file}: missing (meta.json counts split {split!r}); each split needs "
                             f"{split}_images.npy and {split}_captions.json")
        from tunewise.runs import read_user_json

        captions = read_user_json(captions_file)
        if not isinstance(captions, dict) or len(captions) != len(images) or len(images) != int(counts[split]):
            n = len(captions) if isinstance(captions, dict) else "not a mapping of"
            raise ValueError(f"{folder}: split {split!r} has {len(images)} images in {split}_images.npy, {n} "
                             f"captions in {split}_captions.json and {counts[split]} in meta.json; they must agree")
        out[split] = len(images)
    return out


def load_images(path: Path, mmap: bool = True) -> np.ndarray:
    """A split's uint8 [N, H, W, 3] images; never unpickles (allow_pickle=False), so a .npy of Python objects is
    refused, named, instead of running its code or failing with a traceback."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (meta.json names its split); write it with np.save of a uint8 "
                         f"[N, H, W, 3] array")
    try:
        images = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "pickle" in str(e) or "Python objects" in str(e):
            raise ValueError(f"{path}: holds pickled Python objects (dtype object), which pez never loads; save "
                             f"the images with np.save as a uint8 [N, H, W, 3] array") from None
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: a {images.dtype} array of shape {list(images.shape)}; pez reads uint8 "
                         f"[N, H, W, 3] RGB images")
    return images
