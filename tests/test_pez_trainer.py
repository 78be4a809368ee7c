"""The `pez` trainer: a run on generated shapes with a (briefly trained) tiny CLIP, its history, metrics,
prompts and checkpoints, the test-split search, the report section, and config errors."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tunewise.runs import RunDir, read_json
from tunewise.trainers import budget, budget_key, get_trainer
from tunewise.trainers.pez import clip as pclip
from tunewise.trainers.pez import shapes
from tunewise.trainers.pez.trainer import PROMPTS_FILE, PezTrainer


class Rows:
    def __init__(self):
        self.rows = []

    def epoch(self, step, row):
        self.rows.append((step, row))

    def replay(self, rows):
        pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = tmp_path_factory.mktemp("pezdata")
    trainer = PezTrainer()
    cfg = trainer.default_config()
    cfg["data"]["generator"] = {"n_train": 256, "n_val": 16, "n_test": 8}
    cfg["data"]["n_targets"] = 5
    cfg["data"]["prepared_dir"] = str(data)
    trainer.prepare_data(cfg["data"], data, threads=1)
    pclip.train_tiny_clip(data, data / "clip", epochs=2, batch_size=64, threads=1, progress=False)
    cfg["pez"].update(iter=25, prompt_len=6)
    cfg["train"].update(report_every=5, random_prompts=16)
    return cfg


def test_run_reports_every_window_and_writes_prompts(prepared, tmp_path):
    trainer = get_trainer("pez")
    run = RunDir(tmp_path / "run")
    run.start(prepared, 0)
    rows = Rows()
    metrics = trainer.run(copy.deepcopy(prepared), 0, run, rows, torch.device("cpu"),
                          {"name": "val/caption_ratio", "direction": "max"}, progress=False)
    assert [s for s, _ in rows.rows] == [5, 10, 15, 20, 25]
    history = pd.read_csv(run.history_path)
    assert list(history["step"]) == [5, 10, 15, 20, 25]
    best = history["val/similarity"].to_numpy()
    assert (best[1:] >= best[:-1]).all()  # best-so-far never falls
    # seed 000's watch list: the prompt gradient's norm, tokens changing per step, and between logged rows
    assert (history["grad_norm"] > 0).all() and history["train/token_change"].between(0, 1).all()
    churn = history["train/prompt_churn"]
    assert math.isnan(churn.iloc[0]) and churn.iloc[1:].between(0, 1).all()
    prompts = read_json(run.path / PROMPTS_FILE)
    targets = prompts["targets"]
    assert prompts["split"] == "val" and len(targets) == 5
    for t in targets:
        assert t["ratio"] == pytest.approx(t["similarity"] / t["caption_similarity"])
        assert (run.path / t["image"]).is_file() and len(t["ids"]) == 6
    # the primary metric is the mean of the per-target ratios the run wrote
    mean_ratio = sum(t["ratio"] for t in targets) / len(targets)
    assert metrics["primary"]["final"] == pytest.approx(mean_ratio, abs=1e-6)
    assert metrics["pez"]["val/caption_ratio"] == pytest.approx(mean_ratio, abs=1e-6)
    assert metrics["epochs_planned"] == 25 and metrics["epochs_run"] == 5
    assert metrics["pez"]["val/similarity"] > metrics["pez"]["val/random_similarity"]
    assert (run.checkpoints / "best.pt").is_file() and (run.checkpoints / "last.pt").is_file()
    # the same seed gives the same prompts
    run2 = RunDir(tmp_path / "run2")
    run2.start(prepared, 0)
    trainer.run(copy.deepcopy(prepared), 0, run2, Rows(), torch.device("cpu"),
                {"name": "val/caption_ratio", "direction": "max"}, progress=False)
    assert [t["prompt"] for t in read_json(run2.path / PROMPTS_FILE)["targets"]] == [t["prompt"] for t in targets]

    tables = tmp_path / "final_test"
    test = trainer.evaluate_test(copy.deepcopy(prepared), run.checkpoints / "best.pt", torch.device("cpu"), tables)
    assert test["test/n"] == 5 and 0 < test["test/caption_ratio"]
    assert all(isinstance(v, (int, float)) for v in test.values())  # tables are files, not metrics
    prompts = read_json(tables / "prompts_test.json")
    assert prompts["split"] == "test" and len(prompts["targets"]) == 5
    assert all(t["image_id"].startswith("test-") and (tables / t["image"]).is_file() for t in prompts["targets"])


def test_report_section_shows_prompts_images_and_curve(prepared, tmp_path):
    from tunewise.reports.markdown import render
    from tunewise.trainers.pez import report as pez_report

    run = RunDir(tmp_path / "run")
    run.start(prepared, 0)
    PezTrainer().run(copy.deepcopy(prepared), 1, run, Rows(), torch.device("cpu"),
                     {"name": "val/caption_ratio", "direction": "max"}, progress=False)
    report = tmp_path / "reports" / "r.md"
    section = pez_report.prompt_table(run.path / PROMPTS_FILE, run.path, report, tmp_path / "reports" / "plots", "x", "t",
                                      "baseline run")
    assert section["n"] == 5 and all(p.is_file() for p in section["written"])
    assert section["curve"] and section["grid"]
    text = render("_prompts.md.j2", beside=Path(pez_report.__file__).parent, prompts=section)
    targets = read_json(run.path / PROMPTS_FILE)["targets"]
    for t in targets:
        assert t["caption"] in text and f"`{t['prompt']}`" in text
    assert "](../run/targets/val-000000.png)" in text
    ratio = next(r["value"] for r in section["summary"] if r["label"].startswith("PEZ / caption (ids)"))
    assert ratio == pytest.approx(sum(t["ratio"] for t in targets) / len(targets))


def test_budget_is_the_iteration_count():
    trainer = PezTrainer()
    cfg = trainer.default_config()
    assert budget_key(trainer) == "pez.iter" and budget(trainer, cfg) == cfg["pez"]["iter"]
    assert budget_key(get_trainer("latent")) == "train.epochs"


@pytest.mark.parametrize("patch, message", [
    ({"pez": {"prompt_len": 0}}, "prompt_len"),
    ({"pez": {"lr": -1}}, "pez.lr"),
    ({"data": {"clip": {"model": "ViT-B-32"}}}, "data.clip"),
    ({"data": {"clip": {"checkpoint": "/nonexistent/clip.pt"}}}, "data.clip.checkpoint"),
    ({"data": {"n_targets": 0}}, "data.n_targets"),
    ({"train": {"report_every": 0}}, "train.report_every"),
])
def test_bad_config_names_the_key(patch, message):
    from tunewise.config import deep_merge

    trainer = PezTrainer()
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace(".", r"\.")):
        trainer.check_config(deep_merge(trainer.default_config(), patch))


def test_missing_tiny_clip_is_a_clear_error(tmp_path):
    trainer = PezTrainer()
    cfg = trainer.default_config()
    cfg["data"]["generator"] = {"n_train": 8, "n_val": 4, "n_test": 4}
    cfg["data"]["prepared_dir"] = str(tmp_path)
    trainer.prepare_data(cfg["data"], tmp_path, threads=1)
    run = RunDir(tmp_path / "run")
    run.start(cfg, 0)
    with pytest.raises(FileNotFoundError, match="preparation step `clip`"):
        trainer.run(cfg, 0, run, Rows(), torch.device("cpu"), {"name": "val/caption_ratio", "direction": "max"})
