"""A user's folder of images for the pez trainer (issue 15): what prepare-data makes of it (arrays, split, the
data_checks summary, the cache), the metric that follows the captions at resolve time, a CLIP of the user's own,
the tiny CLIP never training 0 steps, and the report section without captions. The refusals are cases of the
bad-input corpus (tests/data/bad/cases_pez.yaml); the whole workflow is tests/test_pez_user_data_e2e.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pez_images import write_image_folder
from tunewise.config import ConfigError
from tunewise.experiment import resolve_experiment, validate
from tunewise.trainers.pez import folder as pfolder
from tunewise.trainers.pez import shapes
from tunewise.trainers.pez.spec import PezSpec

CHECK_KEYS = {"rows", "dropped", "warnings", "notes"}


def _config(path: Path, prepared: Path, **data) -> dict:
    cfg = PezSpec().default_config()
    cfg["data"].update(source="path", path=str(path), prepared_dir=str(prepared), n_targets=3, **data)
    return cfg


def _trainer():
    from tunewise.trainers import get_trainer

    return get_trainer("pez")


def _defects(root: Path) -> None:
    """One of each thing prepare-data drops, beside good images."""
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "pixel.png")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "black.png")
    (root / "fake.jpg").write_text("not a jpeg")
    (root / "notes.txt").write_text("notes")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / ".ipynb_checkpoints" / "black-checkpoint.png")


def test_captioned_folder_is_split_checked_and_cached(tmp_path):
    captions = write_image_folder(tmp_path / "imgs", n=20)
    _defects(tmp_path / "imgs")
    # a caption naming no image, and an image without a caption
    with open(tmp_path / "imgs" / "captions.csv", "a") as f:
        f.write("gone.png,a picture that was deleted\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
        tmp_path / "imgs" / "uncaptioned.png")
    cfg = _config(tmp_path / "imgs", tmp_path / "prep")
    ready = _trainer().prepare_data(cfg["data"], tmp_path / "prep", threads=1)
    checks = ready["data_checks"]
    assert set(checks) == CHECK_KEYS
    assert checks["rows"].items() >= {"images": 20, "clip_train": 16, "held_out": 4, "val": 2, "test": 2, "captions": 20}.items()
    dropped = {d["reason"]: (d["count"], d["examples"]) for d in checks["dropped"]}
    assert dropped == {"not an image (by its extension)": (1, ["notes.txt"]),
                       "unreadable or truncated image": (1, ["fake.jpg"]),
                       "smaller than 8 px": (1, ["pixel.png"]), "a single colour": (1, ["black.png"]),
                       "no caption in captions.csv": (1, ["uncaptioned.png"]),
                       "a hidden folder (not read)": (1, [".ipynb_checkpoints"])}
    assert any("1 caption(s) name no image" in w and "gone.png" in w for w in checks["warnings"])
    assert any("smaller than one batch" in n for n in checks["notes"])
    assert any("fewer than data.n_targets" in n for n in checks["notes"])
    # the arrays layout training reads, with each image's caption and file
    images, ids, caps = shapes.load_split(tmp_path / "prep", "train")
    files = json.loads((tmp_path / "prep" / "train_files.json").read_text())
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert [captions[files[i]] for i in ids] == caps
    # cached: the same answer, the arrays left alone; a new image re-prepares and keeps the others' sides
    stamp = (tmp_path / "prep" / "meta.json").stat().st_mtime_ns
    assert _trainer().prepare_data(cfg["data"], tmp_path / "prep", threads=1) == ready
    assert (tmp_path / "prep" / "meta.json").stat().st_mtime_ns == stamp
    before = pfolder.split_files(sorted(captions), 0.2, True)
    after = pfolder.split_files(sorted(captions) + ["new.png"], 0.2, True)
    assert len(set(before["train"]) - set(after["train"])) <= 1


def test_captions_json_or_a_named_file(tmp_path):
    write_image_folder(tmp_path / "a", n=12, captions="captions.json")
    write_image_folder(tmp_path / "b", n=12, captions="labels.csv")
    for root, extra in ((tmp_path / "a", {}), (tmp_path / "b", {"captions": "labels.csv"})):
        cfg = _config(root, root.parent / f"prep_{root.name}", **extra)
        assert PezSpec().primary_metric_for(cfg) == "val/caption_ratio"
        ready = _trainer().prepare_data(cfg["data"], Path(cfg["data"]["prepared_dir"]), threads=1)
        assert ready["data_checks"]["rows"]["captions"] == 12 and not ready["data_checks"]["dropped"]


def test_the_metric_follows_the_captions_at_resolve_time_without_torch(tmp_path):
    write_image_folder(tmp_path / "with", n=4)
    write_image_folder(tmp_path / "without", n=4, captions=None)
    config = validate({"experiments": {
        name: {"trainer": "pez", "data": {"source": "path", "path": str(tmp_path / name)}}
        for name in ("with", "without")}})
    assert resolve_experiment(config, "with")["metric"]["name"] == "val/caption_ratio"
    assert resolve_experiment(config, "without")["metric"]["name"] == "val/similarity"
    # an explicit metric.name wins, as for every trainer; one the run would not write is refused at validation
    config["experiments"]["without"]["metric"]["name"] = "val/random_similarity"
    assert resolve_experiment(config, "without")["metric"]["name"] == "val/random_similarity"
    config["experiments"]["without"]["metric"]["name"] = "val/caption_ratio"
    with pytest.raises(ConfigError, match="experiments.without.metric.name: the pez trainer writes no metric "
                                          "'val/caption_ratio'"):
        resolve_experiment(config, "without")


def test_tiny_clip_trains_with_a_smaller_batch_and_never_zero_steps(tmp_path):
    from tunewise.trainers.pez import clip as pclip

    shapes.write_split(tmp_path / "d", shapes.ShapesConfig(counts={"train": 5, "val": 3, "test": 2}))
    metrics = pclip.train_tiny_clip(tmp_path / "d", tmp_path / "c", epochs=1, batch_size=128, threads=1,
                                    progress=False)
    assert metrics["steps"] == 1 and metrics["batch_size"] == 5
    shapes.write_split(tmp_path / "one", shapes.ShapesConfig(counts={"train": 1, "val": 1, "test": 1}))
    with pytest.raises(ValueError, match="at least 2 captioned training images"):
        pclip.train_tiny_clip(tmp_path / "one", tmp_path / "c1", epochs=1, threads=1, progress=False)
    with pytest.raises(ValueError, match="0 steps"):
        pclip.train_tiny_clip(tmp_path / "d", tmp_path / "c0", epochs=0, threads=1, progress=False)


def test_own_clip_checkpoint_on_images_without_captions(tmp_path):
    """data.clip: {model, checkpoint}: no tiny CLIP to train, every image held out, the similarity measured."""
    import torch

    from tunewise.runs import RunDir
    from tunewise.trainers.pez import TINY_CLIP_NAME
    from tunewise.trainers.pez import clip as pclip

    weights = pclip.save_checkpoint(pclip.build_tiny_clip(tmp_path / "model"), tmp_path / "model", epoch=0)
    write_image_folder(tmp_path / "imgs", n=6, captions=None)
    cfg = _config(tmp_path / "imgs", tmp_path / "prep")
    cfg["data"]["clip"].update(model=TINY_CLIP_NAME, checkpoint=str(weights))
    trainer = _trainer()
    trainer.check_config(cfg)
    assert trainer.preparation_steps(cfg) == {}
    ready = trainer.prepare_data(cfg["data"], tmp_path / "prep", threads=1)
    assert ready["data_checks"]["rows"].items() >= {"images": 6, "clip_train": 0, "held_out": 6}.items()
    assert not (tmp_path / "prep" / "shapes").exists()  # no tiny CLIP, so no shapes to teach it
    cfg["pez"].update(iter=4, prompt_len=3)
    cfg["train"].update(report_every=2, random_prompts=4)
    run = RunDir(tmp_path / "run")
    run.start(cfg, 0)
    rows = []
    reporter = type("R", (), {"epoch": lambda self, step, row: rows.append(row)})()
    with pytest.raises(ValueError, match="needs captions"):
        trainer.run(copy.deepcopy(cfg), 0, run, reporter, torch.device("cpu"),
                    {"name": "val/caption_ratio", "direction": "max"}, progress=False)
    metrics = trainer.run(copy.deepcopy(cfg), 0, run, reporter, torch.device("cpu"),
                          {"name": "val/similarity", "direction": "max"}, progress=False)
    assert metrics["primary"]["name"] == "val/similarity" and "val/caption_ratio" not in rows[-1]
    targets = json.loads((run.path / "prompts.json").read_text())["targets"]
    assert len(targets) == 3 and all(t["caption"] is None and t["ratio"] is None and t["file"] for t in targets)


def test_a_damaged_own_checkpoint_is_refused_at_prepare_data(tmp_path):
    from tunewise.trainers.pez import TINY_CLIP_NAME
    from tunewise.trainers.pez import clip as pclip

    pclip.write_model_config(tmp_path / "model")
    (tmp_path / "model" / "tiny_clip.pt").write_bytes(b"\x80\x02 not a checkpoint")
    write_image_folder(tmp_path / "imgs", n=4, captions=None)
    cfg = _config(tmp_path / "imgs", tmp_path / "prep")
    cfg["data"]["clip"].update(model=TINY_CLIP_NAME, checkpoint=str(tmp_path / "model" / "tiny_clip.pt"))
    with pytest.raises(ValueError, match="does not load from"):
        _trainer().prepare_data(cfg["data"], tmp_path / "prep", threads=1)
    assert not (tmp_path / "prep" / "meta.json").exists()


def test_embedded_and_arrays_layouts_report_data_checks(tmp_path):
    trainer = _trainer()
    cfg = PezSpec().default_config()
    cfg["data"]["generator"] = {"n_train": 8, "n_val": 4, "n_test": 4}
    ready = trainer.prepare_data(cfg["data"], tmp_path / "emb", threads=1)
    assert set(ready["data_checks"]) == CHECK_KEYS
    assert ready["data_checks"]["rows"] == {"images": 16, "clip_train": 8, "held_out": 8}
    cfg = _config(tmp_path / "emb", tmp_path / "prep2")  # the generated folder as a user's arrays folder
    assert trainer.prepare_data(cfg["data"], tmp_path / "prep2", threads=1)["data_checks"]["rows"]["held_out"] == 8


def test_report_section_without_captions_says_the_ratio_is_unavailable(tmp_path):
    from tunewise.trainers.pez.report import prompt_table

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "t.png")
    target = {"image_id": "val-000000", "file": "photos/beach.png", "caption": None, "prompt": "sea sand",
              "similarity": 0.3, "text_similarity": 0.3, "caption_similarity": None, "ratio": None,
              "random_similarity": 0.1, "random_best_similarity": 0.2, "token_recovery": None, "image": "t.png"}
    (tmp_path / "prompts.json").write_text(json.dumps({"split": "val", "targets": [target]}))
    table = prompt_table(tmp_path / "prompts.json", None, tmp_path / "r.md", tmp_path / "plots", "b", "B", "baseline run")
    assert table["captioned"] is False
    assert [r["label"] for r in table["summary"]] == ["PEZ prompt similarity (ids as optimised)",
                                                      "PEZ prompt similarity (decoded text, tokenised again)",
                                                      "random prompt similarity (mean)",
                                                      "random prompt similarity (best of n, per target)"]
    from tunewise.reports.markdown import render

    text = render("_prompts.md.j2", beside=Path(pfolder.__file__).parent, prompts=table)
    assert "the caption ratio is unavailable" in text and "photos/beach.png" in text and "`sea sand`" in text
