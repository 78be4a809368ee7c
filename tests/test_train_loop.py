"""The shared machinery: optimizer/schedule factory, fit loop, checkpoints, resume, divergence."""
import math

import pandas as pd
import pytest
import torch

from tunewise.runs import RunDir, read_json
from tunewise.trainers.base import NonFiniteLoss
from tunewise.train.optim import Schedule, build_optimizer
from toy_trainer import ToyTrainer

METRIC = {"name": "val/neg_mse", "direction": "max"}


class Recorder:
    def __init__(self, stop_after=None):
        self.steps, self.replayed, self.stop_after = [], [], stop_after

    def epoch(self, step, row):
        self.steps.append(step)
        if self.stop_after is not None and step == self.stop_after:
            raise KeyboardInterrupt("simulated kill")

    def replay(self, rows):
        self.replayed.extend(r["step"] for r in rows)


def train(tmp_path, name="run", reporter=None, **overrides):
    trainer = ToyTrainer()
    config = trainer.default_config()
    for section, values in overrides.items():
        config[section].update(values)
    run = RunDir(tmp_path / name)
    run.start(config, seed=3)
    metrics = trainer.run(config, 3, run, reporter or Recorder(), torch.device("cpu"), METRIC, progress=False)
    run.finish(metrics)
    return run, metrics


def test_fit_writes_the_run_contract(tmp_path):
    run, metrics = train(tmp_path)
    hist = pd.read_csv(run.history_path)
    assert list(hist["step"]) == list(range(1, 9))
    for col in ("train/loss", "val/loss", "val/neg_mse", "lr", "grad_norm", "grad_norm_p90", "grad_clip_frac", "update_ratio",
                "seconds", "samples_per_s", "data_frac"):
        assert col in hist and hist[col].notna().all(), col
    assert metrics["primary"]["best"] == pytest.approx(hist["val/neg_mse"].max())
    assert metrics["best_step"] == int(hist.loc[hist["val/neg_mse"].idxmax(), "step"])
    assert (run.checkpoints / "best.pt").exists() and (run.checkpoints / "last.pt").exists()
    assert read_json(run.metrics_path)["status"] == "done" and run.status == "done"
    # the model learns the linear target
    assert hist["val/loss"].iloc[-1] < hist["val/loss"].iloc[0] / 3


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    full, full_metrics = train(tmp_path, "full")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "cut", reporter=Recorder(stop_after=4))
    cut = RunDir(tmp_path / "cut")
    assert not cut.metrics_path.exists() and cut.status == "running"
    assert torch.load(cut.checkpoints / "last.pt", weights_only=True)["epoch"] == 4
    recorder = Recorder()
    resumed, metrics = train(tmp_path, "cut", reporter=recorder)
    assert recorder.steps == [5, 6, 7, 8]  # only the missing epochs are trained
    assert recorder.replayed == [1, 2, 3, 4]  # and the earlier rows are offered to the tracker again
    a, b = pd.read_csv(full.history_path), pd.read_csv(resumed.history_path)
    cols = ["step", "train/loss", "val/loss", "lr"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert metrics["primary"]["best"] == pytest.approx(full_metrics["primary"]["best"])


def test_nan_loss_raises_with_the_step_and_keeps_the_history(tmp_path):
    with pytest.raises(NonFiniteLoss) as e:
        train(tmp_path, train={"nan_at_epoch": 3})
    assert e.value.step == 2 * 6 + 1  # first step of epoch 3 (6 batches per epoch)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(hist) == 3 and math.isnan(hist["train/loss"].iloc[-1])


def test_early_stopping_stops_after_patience(tmp_path):
    _, metrics = train(tmp_path, train={"epochs": 40, "patience": 2, "min_delta": 10.0})
    assert metrics["stopped_early"] and metrics["epochs_run"] == 3 and metrics["best_step"] == 1


def test_update_ratio_follows_the_learning_rate(tmp_path):
    ratios = {}
    for lr in (1e-3, 1e-2):
        run, _ = train(tmp_path, name=f"lr{lr}", optim={"lr": lr})
        ratio = pd.read_csv(run.history_path)["update_ratio"]
        assert ratio.notna().all() and (ratio > 0).all()
        ratios[lr] = float(ratio.median())
    # Adam's step is about lr per parameter: ten times the LR gives several times the relative update
    assert ratios[1e-2] > 4 * ratios[1e-3]


def test_update_ratio_measures_one_optimizer_step():
    from tunewise.train.loop import _update_ratio

    params = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0]])]
    before = [p.clone() for p in params]
    params[0] += torch.tensor([0.3, 0.4])
    assert float(_update_ratio(params, before)) == pytest.approx(0.1)


def test_grad_clip_fraction_is_recorded(tmp_path):
    run, _ = train(tmp_path, train={"grad_clip": 1e-6})
    assert pd.read_csv(run.history_path)["grad_clip_frac"].min() == 1.0


def test_optimizer_factory_and_param_groups():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = build_optimizer(model, {"name": "sgd", "lr": 0.1, "momentum": 0.5, "param_groups": {"1": {"lr": 0.01}}})
    assert isinstance(opt, torch.optim.SGD)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.01, 0.1]
    assert opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="optim.param_groups.nope"):
        build_optimizer(model, {"name": "adam", "lr": 0.1, "param_groups": {"nope": {"lr": 1}}})
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(model, {"name": "lion", "lr": 0.1})
    assert isinstance(build_optimizer(model, {"name": "adamw", "lr": 0.1}), torch.optim.AdamW)


def _lrs(cfg, epochs=4, steps=5, metric=None):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 1.0}], lr=1.0)
    sched = Schedule(opt, cfg, epochs, steps)
    out = []
    for e in range(epochs):
        for _ in range(steps):
            out.append(sched.lr())
            sched.step_batch()
        sched.step_epoch(metric[e] if metric else 0.0, True)
    return out


def test_schedules():
    assert set(_lrs({"name": "none"})) == {1.0}
    lin = _lrs({"name": "linear", "lr_end_factor": 0.1})
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.1 + 0.9 / 20, rel=1e-6) and lin == sorted(lin, reverse=True)
    cos = _lrs({"name": "cosine", "lr_end_factor": 0.0})
    assert cos[0] == 1.0 and cos[10] == pytest.approx(0.5) and cos[-1] < 0.01
    step = _lrs({"name": "step", "step_size": 2, "gamma": 0.1})
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1)
    warm = _lrs({"name": "none", "warmup_epochs": 1})
    assert warm[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and warm[5:] == [1.0] * 15
    plateau = _lrs({"name": "plateau", "patience": 0, "gamma": 0.5}, metric=[1.0, 0.5, 0.5, 0.5])
    assert plateau[5] == 1.0 and plateau[10] == 0.5 and plateau[15] == 0.25
    with pytest.raises(ValueError, match="schedule.name"):
        _lrs({"name": "exp"})


def test_corrupted_checkpoint_is_named(tmp_path):
    run = RunDir(tmp_path / "r")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="last.pt cannot be loaded"):
        run.load_checkpoint("last.pt")
