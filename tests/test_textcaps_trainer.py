"""The textcaps trainer end to end on a tiny generated dataset: metrics, resume, ERM vs GroupDRO, config checks."""
import copy

import pandas as pd
import pytest
import torch

from tunewise.config import ConfigError
from tunewise.experiment import validate
from tunewise.runs import RunDir, read_json
from tunewise.trainers import get_trainer
from tunewise.trainers.textcaps.trainer import TextCapsTrainer, _translate, build_model

METRIC = {"name": "val/worst_group_acc", "direction": "max"}
TINY = {"n_train": 300, "n_val": 100, "n_test": 50, "image_size": 32, "seed": 0}
VOLATILE = {"seconds", "samples_per_s", "data_frac"}


class Recorder:
    def __init__(self, stop_after=None):
        self.rows, self.replayed, self.stop_after = [], [], stop_after

    def epoch(self, step, row):
        self.rows.append(row)
        if self.stop_after is not None and step == self.stop_after:
            raise KeyboardInterrupt("simulated kill")

    def replay(self, rows):
        self.replayed.extend(r["step"] for r in rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    trainer = TextCapsTrainer()
    config = trainer.default_config()
    config["data"]["generator"].update(TINY)
    config["data"]["image_size"] = 32
    config["model"].update(latent_dim=16, head_hidden=16)
    config["model"]["visual"]["width"] = 8
    config["train"].update(epochs=3, batch_size=32, eval_train_samples=120, eval_batch_size=64)
    config["groupdro"].update(warmup_epochs=1, eta=0.5)
    out = tmp_path_factory.mktemp("textcaps_tiny")
    info = trainer.prepare_data(config["data"], out, threads=1)
    assert info["n_rows"] == 450 and info["source"] == "embedded"
    config["data"]["prepared_dir"] = str(out)
    return config


def train(tmp_path, config, name="run", reporter=None, seed=1):
    trainer = TextCapsTrainer()
    run = RunDir(tmp_path / name)
    run.start(config, seed)
    metrics = trainer.run(config, seed, run, reporter or Recorder(), torch.device("cpu"), METRIC, progress=False)
    run.finish(metrics)
    return run, metrics


def test_run_writes_per_group_metrics(tmp_path, tiny):
    run, metrics = train(tmp_path, tiny)
    hist = pd.read_csv(run.history_path)
    assert list(hist["step"]) == [1, 2, 3]
    for split in ("train", "val"):
        for col in ("loss", "acc", "worst_group_acc", "avg_acc", "acc/majority", "acc/minority", "class_acc/bottle"):
            assert f"{split}/{col}" in hist and hist[f"{split}/{col}"].notna().all(), f"{split}/{col}"
        worst, avg = hist[f"{split}/worst_group_acc"], hist[f"{split}/avg_acc"]
        assert (worst <= avg + 1e-12).all()
        groups = hist[[f"{split}/acc/majority", f"{split}/acc/minority"]]
        pd.testing.assert_series_equal(worst, groups.min(axis=1), check_names=False)
    assert "val/acc/minority/mobile_phone" in hist  # per group and class, on val
    for col in ("q/majority", "q/minority", "train/ce", "train/anchor_fit", "train/anchor_sep", "lr", "grad_norm",
                "groupdro/q_entropy", "groupdro/q_max", "val/class_sep", "val/confusion_top_share"):
        assert col in hist and hist[col].notna().all(), col
    # what the textcaps diagnosis reads: q's spread, and the confused pairs by name at the best step
    assert hist["groupdro/q_max"].round(9).eq(hist[["q/majority", "q/minority"]].max(axis=1).round(9)).all()
    assert hist["groupdro/q_entropy"].iloc[0] == pytest.approx(1.0)
    assert all(set(p) == {"classes", "errors"} and p["errors"] > 0 for p in metrics["val_confusion_pairs"])
    assert (hist["q/majority"] + hist["q/minority"]).round(9).eq(1.0).all()
    # warm-up epoch: q uniform; afterwards GroupDRO moves weight onto the harder (minority) group
    assert hist["q/minority"].iloc[0] == pytest.approx(0.5)
    assert hist["q/minority"].iloc[-1] > 0.5
    assert metrics["primary"]["best"] == pytest.approx(hist["val/worst_group_acc"].max())
    assert metrics["group_counts"]["majority"] + metrics["group_counts"]["minority"] == 300
    assert read_json(run.metrics_path)["status"] == "done"
    test = TextCapsTrainer().evaluate_test(tiny, run.checkpoints / "best.pt", torch.device("cpu"), tmp_path / "test")
    confusion = read_json(tmp_path / "test" / "confusion_test.json")  # a table, written beside the metrics
    assert confusion["split"] == "test" and sum(map(sum, confusion["matrix"])) == test["test/n"]
    assert test["test/n"] == 50 and 0.0 <= test["test/worst_group_acc"] <= test["test/avg_acc"] <= 1.0


def test_resume_from_last_checkpoint_gives_the_same_history(tmp_path, tiny):
    config = copy.deepcopy(tiny)
    config["data"]["augment"] = 0.1  # the augmentation draws must resume too
    full, _ = train(tmp_path, config, "full")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, config, "cut", reporter=Recorder(stop_after=2))
    recorder = Recorder()
    resumed, _ = train(tmp_path, config, "cut", reporter=recorder)
    assert [r["step"] for r in recorder.rows] == [3] and recorder.replayed == [1, 2]
    a, b = pd.read_csv(full.history_path), pd.read_csv(resumed.history_path)
    cols = [c for c in a.columns if c not in VOLATILE]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_erm_keeps_q_uniform_and_groupdro_moves_it(tmp_path, tiny):
    erm = copy.deepcopy(tiny)
    erm["groupdro"]["enabled"] = False
    erm["train"]["epochs"] = 2
    run, _ = train(tmp_path, erm, "erm")
    hist = pd.read_csv(run.history_path)
    assert (hist["q/minority"] == 0.5).all()
    dro = copy.deepcopy(erm)
    dro["groupdro"].update(enabled=True, warmup_epochs=0, objective="max")
    run, _ = train(tmp_path, dro, "dro")
    assert pd.read_csv(run.history_path)["q/minority"].iloc[0] != 0.5


def test_expand_mode_with_per_group_encoders(tmp_path, tiny):
    config = copy.deepcopy(tiny)
    config["data"].update(mode="expand", groups=[
        {"name": "image", "modality": "visual"},
        {"name": "ocr", "modality": "text", "encoder": "char_cnn_text", "channels": 8},
        {"name": "both", "modality": "combined"},
    ])
    config["model"]["shared_encoder"] = None
    config["anchors"]["sep_method"] = "w2_margin"
    config["optim"].update(lr_backbone=1e-4, lr_new=2e-3)
    config["train"]["epochs"] = 1
    model = build_model(config, 10)
    assert len(model.encoders) == 3 and model.encoders[1].__class__.__name__ == "CharCNNText"
    run, metrics = train(tmp_path, config, "expand")
    hist = pd.read_csv(run.history_path)
    for g in ("image", "ocr", "both"):
        assert hist[f"val/acc/{g}"].notna().all() and f"q/{g}" in hist
    assert metrics["n_train"] == 900  # one sample per image per group


def test_bad_config_raises_naming_the_key(tiny):
    trainer = TextCapsTrainer()
    cases = [
        ("groupdro", "eta", -1.0, "groupdro.eta"),
        ("groupdro", "update_mode", "fast", "groupdro.update_mode"),
        ("anchors", "sep_method", "cosine", "anchors.sep_method"),
        ("train", "batch_size", 0, "train.batch_size"),
        ("optim", "lr_backbone", 0.0, "optim.lr_backbone"),
        ("data", "mode", "mixed", "data.mode"),
        ("model", "shared_encoder", "audio", "model.shared_encoder"),
    ]
    for section, key, value, needle in cases:
        config = copy.deepcopy(tiny)
        config[section][key] = value
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            trainer.check_config(config)
    config = copy.deepcopy(tiny)
    config["data"]["mode"] = "expand"  # expand needs one encoder per group: a shared one set explicitly contradicts it
    config["model"]["shared_encoder"] = "combined"
    with pytest.raises(ValueError, match=r"model\.shared_encoder"):
        trainer.check_config(config)
    config = copy.deepcopy(tiny)
    config["model"]["visual"]["widht"] = 8
    with pytest.raises(ValueError, match="widht"):
        trainer.check_config(config)
    config = copy.deepcopy(tiny)
    config["data"]["generator"]["n_trian"] = 5
    with pytest.raises(ValueError, match=r"data\.generator"):
        trainer.check_config(config)


def test_config_validate_accepts_the_defaults_and_names_unknown_keys():
    cfg = validate({"experiments": {"tc": {"trainer": "textcaps"}}})
    assert cfg["experiments"]["tc"]["trainer"] == "textcaps"
    assert isinstance(get_trainer("textcaps"), TextCapsTrainer)
    with pytest.raises(ConfigError, match=r"groupdro\.etaa"):
        validate({"experiments": {"tc": {"trainer": "textcaps", "baseline": {"groupdro": {"etaa": 0.1}}}}})
    with pytest.raises(ConfigError, match=r"experiments\.tc: groupdro\.gamma"):
        validate({"experiments": {"tc": {"trainer": "textcaps", "baseline": {"groupdro": {"gamma": 1.5}}}}})


def test_knobs_point_at_existing_keys():
    from tunewise.config import get_dotted

    trainer = TextCapsTrainer()
    config = trainer.default_config()
    for knob, keys in trainer.knobs.items():
        for key in [keys] if isinstance(keys, str) else keys:
            get_dotted(config, key)
    for key in trainer.search_space():
        get_dotted(config, key)


def test_translate_moves_each_image_by_its_own_shift():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 400
    g = torch.Generator().manual_seed(0)
    out = _translate(images, 2, g)
    d = torch.randint(-2, 3, (2, 2), generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for b in range(2):
        dy, dx = int(d[0, b]), int(d[1, b])
        # interior pixels come from (y + dy, x + dx) of the original
        torch.testing.assert_close(out[b, :, 2:6, 2:6], images[b, :, 2 + dy : 6 + dy, 2 + dx : 6 + dx])
