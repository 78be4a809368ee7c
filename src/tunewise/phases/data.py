"""The data phase: an experiment's prepared data (cached) and, for a pez experiment, its embedded tiny CLIP."""
from __future__ import annotations

from pathlib import Path

from tunewise.phases import CliError, tracked


def prepare_data(exp: dict, exp_dir: Path, out: Path, *, threads: int = 1, rule: str | None = None) -> dict:
    """Make the experiment's data ready (the trainer caches it), create the MLflow experiment and the seed runs'
    parent before parallel jobs start, and write `out` (ready.json). Returns what the trainer reported."""
    from tunewise.runs import write_json
    from tunewise.trainers import get_trainer

    trainer = get_trainer(exp["trainer"])
    try:
        # the trainer's own checks, some of which (a textcaps model built from its weights files) need torch
        # and so are not run at the Snakefile parse: still before any training
        trainer.check_config(exp["baseline"])
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"experiments.{exp['name']}: {e}") from None
    data_cfg = exp["baseline"]["data"]
    try:
        info = trainer.prepare_data(data_cfg, Path(data_cfg["prepared_dir"]), threads=threads)
    except ValueError as e:
        # the data loaders' errors name the key and the file: the message is the whole story, not a traceback
        raise CliError(f"data of experiment {exp['name']!r}: {e}") from None
    tracked.parent_run(tracked.tracker(exp), exp, exp_dir, "significance", rule)
    write_json(Path(out), {"experiment": exp["name"], "trainer": exp["trainer"], **info})
    print(f"data ready: {info.get('n_rows', '?')} rows -> {out}")
    return info


def _clip_target(exp: dict, out: Path) -> Path:
    """The folder the pez trainer reads its tiny CLIP from, checked against the rule's --out."""
    from tunewise.trainers.pez.trainer import tiny_clip_dir

    if exp["trainer"] != "pez":
        raise CliError(f"train-clip: experiment {exp['name']!r} uses the {exp['trainer']} trainer, not pez")
    out_dir = tiny_clip_dir(exp["baseline"])
    if out_dir is None:
        raise CliError(f"train-clip: experiments.{exp['name']}.data.clip names its own weights; nothing to train")
    if out.resolve() != (out_dir / "clip_metrics.json").resolve():
        raise CliError(f"train-clip: --out must be {out_dir / 'clip_metrics.json'} (where the pez trainer looks)")
    return out_dir


def train_clip(exp: dict, out: Path, *, threads: int | None = None, rule: str | None = None) -> dict | None:
    """The embedded tiny CLIP of a pez experiment, trained on its prepared shapes (cached on the data and the
    settings: None when the one in place fits). Returns its metrics."""
    from tunewise.devices import set_threads
    from tunewise.runs import read_json
    from tunewise.trainers.base import data_root
    from tunewise.trainers.pez.clip import train_tiny_clip

    out = Path(out)
    out_dir = _clip_target(exp, out)
    config = exp["baseline"]
    data_dir = data_root(config)  # the shapes: generated into prepared_dir, or the user's data.path
    train = config["data"]["clip"]["train"]
    fingerprint = read_json(data_dir / "meta.json")["fingerprint"]
    if out.exists():
        old = read_json(out)
        if old.get("data_fingerprint") == fingerprint and all(old.get(k) == train[k] for k in train):
            print(f"{out}: the tiny CLIP for these data and settings is already trained")
            return None
        out.unlink()  # clip_metrics.json is written last: without it the directory is incomplete
    threads = set_threads(threads)
    metrics = train_tiny_clip(data_dir, out_dir, epochs=int(train["epochs"]), batch_size=int(train["batch_size"]),
                              lr=float(train["lr"]), seed=int(train["seed"]), threads=threads)
    r = metrics["retrieval_val_test"]
    tracker = tracked.tracker(exp)
    run_id = tracker.start_run("tiny-clip", tracked.base_tags(exp, "data", rule))
    tracker.log_params(run_id, {"clip." + k: v for k, v in train.items()} | {"parameters": metrics["parameters"]})
    tracker.log_metrics(run_id, {f"clip/{k}": v for k, v in r.items()} | {"clip/train_seconds": metrics["train_seconds"],
                                                                          "clip/final_train_loss": metrics["final_train_loss"]})
    tracker.log_artifact(run_id, out)
    tracker.end_run(run_id)
    print(f"tiny CLIP: {metrics['parameters'] / 1e6:.1f}M parameters, {metrics['train_seconds']:.0f} s; held-out "
          f"image->caption top-1 {r['image_to_caption_top1']:.3f}, top-5 {r['image_to_caption_top5']:.3f} "
          f"({r['n_images']} images) -> {out}")
    return metrics
