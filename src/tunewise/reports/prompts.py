"""Prompt sections of the reports, for the pez trainer: the prompts found for each target image, how close
they come to the ground-truth caption and to random prompts, the similarity curve and the target images.

Everything comes from files the workflow wrote: a run's `prompts.json` and `history.csv`, or the final phase's
`prompts_test.json`; a run without them gets no section (the template skips it).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tunewise.reports.plots import plot_prompt_targets, plot_similarity_curve
from tunewise.reports.markdown import link
from tunewise.runs import read_history, read_json

PROMPTS_FILE = "prompts.json"  # as tunewise.trainers.pez.trainer writes it (image paths relative to its folder)

SUMMARY = (  # (key in each target, label)
    ("similarity", "PEZ prompt similarity (ids as optimised)"),
    ("text_similarity", "PEZ prompt similarity (decoded text, tokenised again)"),
    ("caption_similarity", "ground-truth caption similarity"),
    ("ratio", "PEZ / caption (ids)"),
    ("text_ratio", "PEZ / caption (text)"),
    ("random_similarity", "random prompt similarity (mean)"),
    ("random_best_similarity", "random prompt similarity (best of n, per target)"),
    ("token_recovery", "caption content words found in the prompt"),
)


def _mean(values) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def _image(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _clip_metrics(run_dir: Path | None) -> dict | None:
    """The embedded tiny CLIP's clip_metrics.json for a run (via its config's data.prepared_dir), or None."""
    import yaml

    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
    data = config.get("data") or {}
    clip = data.get("clip") or {}
    if clip.get("checkpoint") or clip.get("pretrained") or not data.get("prepared_dir"):
        return None
    path = Path(data["prepared_dir"]) / "clip" / "clip_metrics.json"
    return read_json(path) if path.is_file() else None


def prompt_section(prompts_path: Path | None, run_dir: Path | None, report_path: Path, plots_dir: Path, name: str,
                   title: str, run_label: str) -> dict | None:
    """Template context for `_prompts.md.j2`, or None when there is no prompts file."""
    if prompts_path is None or not Path(prompts_path).is_file():
        return None
    prompts_path, report_path, plots_dir = Path(prompts_path), Path(report_path), Path(plots_dir)
    data = read_json(prompts_path)
    targets = data.get("targets") or []
    if not targets:
        return None
    split = data.get("split", "val")
    image_paths = [(prompts_path.parent / t["image"]) if t.get("image") else None for t in targets]
    written = []
    grid = plot_prompt_targets(targets, [_image(p) if p else None for p in image_paths],
                               plots_dir / f"{name}_prompts.png", title=f"{title}: target images, caption -> PEZ prompt")
    written.append(grid)
    curve = None
    if run_dir is not None:
        curve = plot_similarity_curve(read_history(Path(run_dir)), plots_dir / f"{name}_similarity.png",
                                      title=f"{title}: similarity over PEZ steps")
        if curve is not None:
            written.append(curve)
    rows = [{
        "image": link(p, report_path) if p is not None and p.is_file() else None,
        "image_id": t.get("image_id"), "caption": t.get("caption"), "prompt": t.get("prompt"),
        "similarity": t.get("similarity"), "caption_similarity": t.get("caption_similarity"),
        "ratio": t.get("ratio"), "random_best_similarity": t.get("random_best_similarity"),
        "token_recovery": t.get("token_recovery"),
    } for t, p in zip(targets, image_paths)]
    summary = [{"label": label, "value": _mean(t.get(key) for t in targets)} for key, label in SUMMARY]
    clip = _clip_metrics(run_dir)
    if clip is not None:
        clip = {**{k: clip.get(k) for k in ("model", "parameters", "epochs", "train_seconds")},
                **(clip.get("retrieval_val_test") or {})}
    return {"split": split, "n": len(targets), "rows": rows, "summary": summary, "run_label": run_label, "clip": clip,
            "grid": link(grid, report_path), "curve": link(curve, report_path) if curve is not None else None,
            "written": written}
