"""The pez trainer's report section (registered in its spec's `report_sections`): the prompts found for each
target image, how close they come to the ground-truth caption and to random prompts, the similarity curve and
the target images, in the diagnostic report, optimization_results.md and the final report.

Everything comes from files the workflow wrote: a run's `prompts.json` and `history.csv`, or the
`prompts_test.json` evaluate_test wrote for the final report; a run without them gets no section.
This module belongs to the report layer: the trainer names it, the report writers import it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tunewise.reports.markdown import link, render
from tunewise.reports.plots import column_series, plt, save_figure
from tunewise.reports.sections import Section, SectionContext
from tunewise.runs import read_history, read_json
from tunewise.trainers.pez.spec import CLIP_DIR, PROMPTS_FILE, TEST_PROMPTS_FILE

CAPTION_KEYS = {"caption_similarity", "ratio", "text_ratio", "token_recovery"}  # need captions
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



def plot_similarity_curve(history: pd.DataFrame, path: Path, split: str = "val", title: str = "") -> Path | None:
    """PEZ over steps: the current prompts' similarity (train/similarity), the best so far ({split}/similarity),
    with the ground-truth captions' and random prompts' similarity as reference lines. None without the columns."""
    best = column_series(history, f"{split}/similarity")
    if best is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    current = column_series(history, "train/similarity")
    if current:
        ax.plot(*current, "-", color="tab:blue", alpha=0.6, label="current prompts (window mean)")
    ax.plot(*best, "-", color="tab:orange", label="best prompts so far")
    for column, style, label in ((f"{split}/caption_similarity", "k--", "ground-truth captions"),
                                 (f"{split}/random_best_similarity", ":", "best of the random prompts"),
                                 (f"{split}/random_similarity", "-.", "random prompts (mean)")):
        series = column_series(history, column)
        if series:
            ax.axhline(float(np.nanmean(series[1])), linestyle=style[-2:] if style.startswith("k") else style,
                       color="black" if style.startswith("k") else "tab:gray", linewidth=1, label=label)
    ax.set_xlabel("PEZ step")
    ax.set_ylabel("cosine similarity to the target image (mean over targets)")
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_prompt_targets(targets: Sequence[Mapping], images: Sequence[np.ndarray | None], path: Path,
                        title: str = "", columns: int = 5) -> Path:
    """The target images in a grid, each with its ground-truth caption and the prompt PEZ found for it."""
    import textwrap

    n = len(targets)
    rows = max(1, math.ceil(n / columns))
    # room above each image for up to seven lines of caption, prompt and ratio
    fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 3.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        t = targets[i]
        if images[i] is not None:
            ax.imshow(images[i])
        wrap = lambda s: "\n".join(textwrap.wrap(str(s), 34)) or "''"  # noqa: E731
        ratio = t.get("ratio")
        score = f"ratio {ratio:.2f}" if ratio is not None else f"similarity {t.get('similarity', float('nan')):.2f}"
        ax.set_title(f"{wrap(t.get('caption') or t.get('file') or t.get('image_id', ''))}\n-> "
                     f"{wrap(t.get('prompt', ''))}\n{score}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


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
    path = Path(data["prepared_dir"]) / CLIP_DIR / "clip_metrics.json"
    return read_json(path) if path.is_file() else None


def prompt_table(prompts_path: Path | None, run_dir: Path | None, report_path: Path, plots_dir: Path, name: str,
                   title: str, run_label: str) -> dict | None:
    """The context of `_prompts.md.j2`, or None when there is no prompts file."""
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
    # images without captions (a user's folder): no ceiling, so no ratio; the similarity itself is the measure
    captioned = any(t.get("caption_similarity") is not None for t in targets)
    rows = [{
        "image": link(p, report_path) if p is not None and p.is_file() else None,
        "image_id": t.get("file") or t.get("image_id"), "caption": t.get("caption"), "prompt": t.get("prompt"),
        "similarity": t.get("similarity"), "caption_similarity": t.get("caption_similarity"),
        "ratio": t.get("ratio"), "random_best_similarity": t.get("random_best_similarity"),
        "token_recovery": t.get("token_recovery"),
    } for t, p in zip(targets, image_paths)]
    summary = [{"label": label, "value": _mean(t.get(key) for t in targets)} for key, label in SUMMARY
               if captioned or key not in CAPTION_KEYS]
    clip = _clip_metrics(run_dir)
    if clip is not None:
        clip = {**{k: clip.get(k) for k in ("model", "parameters", "epochs", "steps", "train_seconds", "trained_on")},
                **(clip.get("retrieval_val_test") or {})}
    return {"split": split, "n": len(targets), "rows": rows, "summary": summary, "run_label": run_label, "clip": clip,
            "captioned": captioned,
            "grid": link(grid, report_path), "curve": link(curve, report_path) if curve is not None else None,
            "written": written}


def prompt_section(ctx: SectionContext) -> Section | None:
    """The prompts of the run the report shows (its validation targets), or in the final report those the final
    config found for the test split's targets."""
    run_dir = ctx.shown_dir
    if ctx.report == "final":
        path = ctx.tables_dir / TEST_PROMPTS_FILE if ctx.tables_dir is not None else None
        prompts = prompt_table(path, run_dir, ctx.report_path, ctx.plots_dir, ctx.name, ctx.title, "final config")
    else:
        path = Path(run_dir) / PROMPTS_FILE if run_dir is not None else None
        prompts = prompt_table(path, run_dir, ctx.report_path, ctx.plots_dir, ctx.name, ctx.title, ctx.run_label)
    if prompts is None:
        return None
    return Section(render("_prompts.md.j2", beside=Path(__file__).parent, prompts=prompts), prompts["written"])
