"""Faults a training run meets, injected through the toy trainer and the `tunewise` CLI (no Snakemake):
a NaN/inf loss (alone and inside a sweep), running out of memory, and a hard kill of `tunewise train`
followed by the same command in the same run directory (Snakemake's rerun of an incomplete job, a SLURM
requeue). The Snakemake side (retries, killing the whole workflow) is in test_faults_e2e.py."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tunewise.cli import main
from tunewise.runs import read_json
from tunewise.train.oom import batch_size_for, is_out_of_memory

TOY = "toy_trainer:ToyTrainer"
STEPS_PER_EPOCH = 6  # the toy's 192 training rows in batches of 32
# the numbers of a history row that do not depend on the clock
NUMBERS = ["step", "train/loss", "val/loss", "val/neg_mse", "lr", "grad_norm", "update_ratio"]


def _setup(tmp_path: Path, monkeypatch, exp: dict) -> tuple[list[str], Path, str]:
    """A resolved toy experiment `toy` under tmp_path: (--experiment-file args, results dir, MLflow URI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"tracking": {"uri": uri}, "experiments": {"toy": {"trainer": TOY, **exp}}}))
    results = tmp_path / "results" / "toy"
    exp_file = str(results / "experiment.yaml")
    assert main(["resolve", "--config", str(tmp_path / "config.yaml"), "--experiment", "toy", "--out", exp_file]) == 0
    return ["--experiment-file", exp_file], results, uri


def _runs(uri: str, **tags):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return client, [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- NaN / inf -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_nonfinite_loss_ends_the_run_as_diverged_naming_the_step_and_value(tmp_path, monkeypatch, value):
    common, results, uri = _setup(tmp_path, monkeypatch,
                                  {"baseline": {"train": {"epochs": 5, "nan_at_epoch": 3, "nonfinite": value}}})
    run_dir = results / "baseline"
    # a finding for the diagnosis, not a crash: the job succeeds
    assert main(["train", *common, "--run-dir", str(run_dir), "--threads", "1"]) == 0
    reason = f"non-finite loss {value} at step {2 * STEPS_PER_EPOCH + 1}"  # the first batch of epoch 3
    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    assert (info["status"], info["reason"]) == ("diverged", reason)
    assert (metrics["status"], metrics["reason"]) == ("diverged", reason)
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["step"]) == [1, 2, 3]  # the epochs before, and the row where it happened
    assert history["train/loss"].iloc[:2].map(math.isfinite).all() and not math.isfinite(history["train/loss"].iloc[2])
    assert metrics["primary"]["best"] == pytest.approx(history["val/neg_mse"].iloc[:2].max())
    assert metrics["epochs_run"] == 3 and metrics["epochs_planned"] == 5

    client, runs = _runs(uri, phase="baseline")
    assert len(runs) == 1 and runs[0].info.run_id == info["mlflow_run_id"]
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["status"] == "diverged"
    assert runs[0].data.tags["reason"] == reason
    assert _steps(client, info["mlflow_run_id"], "val/neg_mse") == [1, 2]

    # the same job run again: the run is finished, nothing is trained or logged twice
    assert main(["train", *common, "--run-dir", str(run_dir), "--threads", "1"]) == 0
    assert read_json(run_dir / "run.json") == info


def _sweep_after_baseline(tmp_path, monkeypatch, sampler: str, n_trials: int, space: dict):
    """A toy sweep experiment (from the baseline config, no pruner) whose baseline has trained: (CLI arguments,
    tracking URI, the sweep folder)."""
    common, results, uri = _setup(tmp_path, monkeypatch, {
        "baseline": {"train": {"epochs": 4}},
        "optimize": {"strategy": "sweep", "sweep": {"n_trials": n_trials, "sampler": sampler, "pruner": "none",
                                                    "base": "baseline", "space": space}}})
    assert main(["train", *common, "--run-dir", str(results / "baseline"), "--threads", "1"]) == 0
    return common, uri, results / "optimize" / "sweep"


def test_a_sweep_goes_on_past_diverged_trials_and_picks_a_finite_one(tmp_path, monkeypatch):
    # a grid over the epoch the loss turns NaN (never, 2, 3): every slot gets another point, so two of the
    # three trials diverge whatever order the slots run in; the last tell also covers the whole grid
    space = {"train.nan_at_epoch": {"type": "categorical", "choices": [None, 2, 3]}}
    common, uri, sweep_dir = _sweep_after_baseline(tmp_path, monkeypatch, "grid", 3, space)
    for slot in range(3):
        out = sweep_dir / "trials" / f"trial{slot}" / "trial.json"
        assert main(["sweep-trial", *common, "--slot", str(slot), "--out", str(out), "--threads", "1"]) == 0, slot
    assert main(["select-best", *common, "--out-dir", str(sweep_dir)]) == 0

    summary = read_json(sweep_dir / "sweep.json")
    assert summary["states"] == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 2}
    by_point = {t["params"]["train.nan_at_epoch"]: t for t in summary["trials"]}
    for epoch in (2, 3):
        failed = by_point[epoch]
        reason = f"non-finite loss nan at step {(epoch - 1) * STEPS_PER_EPOCH + 1}"
        assert failed["state"] == "FAIL" and failed["reason"] == reason
        info = read_json(Path(failed["run_dir"]) / "run.json")
        assert (info["status"], info["reason"]) == ("diverged", reason)
    best = read_json(sweep_dir / "best.json")
    assert best["params"] == {"train.nan_at_epoch": None} and math.isfinite(best["value"])
    assert best["value"] == by_point[None]["value"]
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["train"]["nan_at_epoch"] is None

    _, trials = _runs(uri, phase="optimize")
    assert sorted(r.data.tags["slot"] for r in trials) == ["0", "1", "2"]  # one MLflow run per slot
    assert sorted((r.info.status, r.data.tags.get("status")) for r in trials) == [
        ("FAILED", "diverged"), ("FAILED", "diverged"), ("FINISHED", None)]


def test_an_interrupted_sweep_trial_trains_its_point_again_and_its_mlflow_run_is_set_aside(tmp_path, monkeypatch):
    import optuna

    from tunewise.tracking import EpochReporter

    # a continuous space and a random sampler: a fresh sample would not be the interrupted trial's point
    space = {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}
    common, uri, sweep_dir = _sweep_after_baseline(tmp_path, monkeypatch, "random", 1, space)
    trial = ["sweep-trial", *common, "--slot", "0", "--out", str(sweep_dir / "trials" / "trial0" / "trial.json")]

    def interrupt(self, step, row):  # Ctrl-C as epoch 1 is reported, after its checkpoint was written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(EpochReporter, "epoch", interrupt)
        with pytest.raises(KeyboardInterrupt):
            main(trial)
    killed = read_json(sweep_dir / "trials" / "trial0" / "run.json")
    assert killed["status"] == "interrupted"

    assert main(trial) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal")))
    study = optuna.load_study(study_name=read_json(sweep_dir / "trials" / "trial0" / "trial.json")["study"], storage=storage)
    first, again = study.trials
    assert (first.state.name, first.user_attrs["fail_kind"]) == ("FAIL", "interrupted")
    assert again.state.name == "COMPLETE" and again.params == first.params  # the same point, trained again
    assert (sweep_dir / "trials" / "interrupted" / "trial0-attempt1" / "checkpoints" / "last.pt").exists()

    _, runs = _runs(uri, phase="optimize")
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 2 and killed["mlflow_run_id"] in by_id
    aside = by_id.pop(killed["mlflow_run_id"])
    assert aside.info.status == "KILLED" and aside.data.tags["status"] == "interrupted"
    (result,) = by_id.values()
    assert result.info.status == "FINISHED" and "status" not in result.data.tags


def test_a_trial_killed_before_its_mlflow_run_id_was_recorded_leaves_no_run_running(tmp_path, monkeypatch):
    """A kill can land after a start created its MLflow run and before run.json names it: the next start of that
    run directory finds the run by its run_dir tag and ends it as interrupted (the kill table met this)."""
    from tunewise.runs import RunDir

    space = {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}
    common, uri, sweep_dir = _sweep_after_baseline(tmp_path, monkeypatch, "random", 1, space)
    trial = ["sweep-trial", *common, "--slot", "0", "--out", str(sweep_dir / "trials" / "trial0" / "trial.json")]

    def killed_here(self, **fields):  # SIGKILL as the run's id is about to be written
        if "mlflow_run_id" in fields:
            raise KeyboardInterrupt
        return original(self, **fields)

    original = RunDir.update_info
    with monkeypatch.context() as m:
        m.setattr(RunDir, "update_info", killed_here)
        with pytest.raises(KeyboardInterrupt):
            main(trial)
    assert read_json(sweep_dir / "trials" / "trial0" / "run.json").get("mlflow_run_id") is None
    client, runs = _runs(uri, phase="optimize")
    (orphan,) = runs
    assert orphan.info.status == "RUNNING"

    assert main(trial) == 0
    _, runs = _runs(uri, phase="optimize")
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 2 and not [r for r in runs if r.info.status == "RUNNING"]
    aside = by_id.pop(orphan.info.run_id)
    assert aside.info.status == "KILLED" and aside.data.tags["status"] == "interrupted" and aside.data.tags["slot"] == "0"
    (result,) = by_id.values()
    assert result.info.status == "FINISHED"


# --- out of memory -------------------------------------------------------------------------------------------


def test_out_of_memory_is_recognised_from_every_allocator():
    try:
        torch.empty(2**60, dtype=torch.uint8)  # a real CPU allocation failure
    except RuntimeError as e:
        cpu = e
    assert is_out_of_memory(cpu), cpu
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("train.batch_size: out of memory is not a batch size"))


def test_the_batch_halves_once_per_recorded_out_of_memory_start():
    oom = {"batch_size": {"configured": 64, "used": 64}, "out_of_memory": True}
    assert batch_size_for(64, {}) == 64
    assert batch_size_for(64, oom) == 32
    assert batch_size_for(64, {"batch_size": {"configured": 64, "used": 32}, "out_of_memory": True}) == 16
    # a start that was killed or failed otherwise keeps the smaller batch: the larger one is known not to fit
    assert batch_size_for(64, {"batch_size": {"configured": 64, "used": 32}, "status": "running"}) == 32
    assert batch_size_for(128, oom) == 128  # another configured batch size starts from itself
    assert batch_size_for(1, {"batch_size": {"configured": 1, "used": 1}, "out_of_memory": True}) == 1


def test_out_of_memory_fails_the_start_and_the_next_trains_half_the_batch_from_scratch(tmp_path, monkeypatch, capsys):
    # batch 32 runs out of memory in epoch 3, after last.pt of epoch 2 was written: the retry must not resume it
    common, results, uri = _setup(tmp_path, monkeypatch, {"baseline": {"train": {
        "epochs": 4, "batch_size": 32, "oom_above_batch": 16, "oom_from_epoch": 3}}})
    run_dir = results / "baseline"
    train = ["train", *common, "--run-dir", str(run_dir), "--threads", "1"]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "out of memory at train.batch_size=32 (OutOfMemoryError: CUDA out of memory." in err
    assert "retrying with a smaller batch, train.batch_size=16, from scratch" in err
    assert "Traceback" not in err
    first = read_json(run_dir / "run.json")
    assert first["status"] == "failed" and first["out_of_memory"] is True
    assert first["reason"].startswith("out of memory at train.batch_size=32")
    assert first["batch_size"] == {"key": "train.batch_size", "configured": 32, "used": 32}
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2

    assert main(train) == 0  # the command Snakemake's retry runs
    second = read_json(run_dir / "run.json")
    assert second["status"] == "done" and second["attempt"] == 2
    assert second["batch_size"] == {"key": "train.batch_size", "configured": 32, "used": 16}
    # the job's log is rewritten by the retry; run.json keeps how the first start ended
    (earlier,) = second["earlier"]
    assert (earlier["attempt"], earlier["status"], earlier["reason"]) == (1, "failed", first["reason"])
    assert earlier["batch_size"]["used"] == 32
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 16
    # from scratch: the same history as a run configured with batch 16 from the start
    assert main(["train", *common, "--run-dir", str(tmp_path / "b16"), "--threads", "1", "--set", "train.batch_size=16"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "history.csv")[NUMBERS],
                                  pd.read_csv(tmp_path / "b16" / "history.csv")[NUMBERS])

    # MLflow: the attempt that ran out of memory stays as a failed run, the retry is a run of its own
    client, runs = _runs(uri, run_dir=run_dir)
    by_id = {r.info.run_id: r for r in runs}
    assert set(by_id) == {first["mlflow_run_id"], second["mlflow_run_id"]}
    failed, retry = by_id[first["mlflow_run_id"]], by_id[second["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert failed.data.tags["reason"].startswith("out of memory at train.batch_size=32")
    assert failed.data.params["train.batch_size"] == "32"
    assert retry.info.status == "FINISHED" and retry.data.params["train.batch_size"] == "16"
    assert retry.data.tags["batch_size_configured"] == "32" and retry.data.tags["retry_of"] == failed.info.run_id
    assert _steps(client, retry.info.run_id, "val/neg_mse") == [1, 2, 3, 4]


# --- a hard kill of `tunewise train`, and the same command again ---------------------------------------------


def test_a_run_killed_after_it_stopped_early_is_not_trained_further(tmp_path):
    """Killed between its last epoch and being recorded as finished: the restart finds last.pt with the
    patience used up and ends where the run had stopped, not one epoch later."""
    from tunewise.runs import RunDir
    from toy_trainer import ToyTrainer

    class Quiet:
        def epoch(self, step, row):
            pass

        def replay(self, rows):
            pass

    trainer = ToyTrainer()
    config = trainer.default_config()
    config["train"].update({"epochs": 8, "patience": 1, "min_delta": 100.0})  # no epoch beats the first by 100
    metric = {"name": "val/neg_mse", "direction": "max"}
    run = RunDir(tmp_path / "run")
    run.start(config, seed=3)
    first = trainer.run(config, 3, run, Quiet(), torch.device("cpu"), metric, progress=False)
    assert first["stopped_early"] and first["epochs_run"] == 2
    run.start(config, seed=3)  # the same run started again, before metrics.json was written
    again = trainer.run(config, 3, run, Quiet(), torch.device("cpu"), metric, progress=False)
    assert again["stopped_early"] and again["epochs_run"] == 2 and again["primary"] == first["primary"]
    assert list(pd.read_csv(run.history_path)["step"]) == [1, 2]


def test_train_killed_hard_and_started_again_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """SIGKILL (what a node loss, the OOM killer or the end of SLURM's grace period does: no handler runs),
    then the same command in the same run directory, as Snakemake's rerun of an incomplete job and a SLURM
    requeue do."""
    epochs = 12
    common, results, uri = _setup(tmp_path, monkeypatch, {"baseline": {"train": {"epochs": epochs, "sleep": 0.1}}})
    run_dir = results / "baseline"
    cmd = [str(Path(sys.executable).parent / "tunewise"), "train", *common, "--run-dir", str(run_dir), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # kill once MLflow holds some epochs (so the restart has logged rows not to repeat) and training goes on
    deadline, logged, epoch = time.time() + 240, [], 0
    while time.time() < deadline and proc.poll() is None and not logged:
        time.sleep(0.2)
        run_id = (read_json(run_dir / "run.json").get("mlflow_run_id") if (run_dir / "run.json").exists() else None)
        logged = _steps(client, run_id, "val/neg_mse") if run_id else []
    if (run_dir / "checkpoints" / "last.pt").exists():
        epoch = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0].decode(errors="replace")
    assert logged and epoch < epochs, f"never saw logged epochs while training went on (epoch {epoch})\n{out[-2000:]}"
    killed = read_json(run_dir / "run.json")
    assert killed["status"] == "running" and not (run_dir / "metrics.json").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from checkpoints/last.pt" in again.stdout
    info = read_json(run_dir / "run.json")
    assert info["status"] == "done" and info["attempt"] == 2 and info["mlflow_run_id"] == killed["mlflow_run_id"]
    assert [e["status"] for e in info["earlier"]] == ["killed"]

    # the uninterrupted run of the same config (the sleep only sets the pace)
    assert main(["train", *common, "--run-dir", str(tmp_path / "whole"), "--threads", "1", "--set", "train.sleep=0"]) == 0
    resumed, whole = pd.read_csv(run_dir / "history.csv"), pd.read_csv(tmp_path / "whole" / "history.csv")
    pd.testing.assert_frame_equal(resumed[NUMBERS], whole[NUMBERS])
    assert read_json(run_dir / "metrics.json")["primary"] == read_json(tmp_path / "whole" / "metrics.json")["primary"]

    # one MLflow run for the run directory, every metric of every epoch exactly once
    _, runs = _runs(uri, run_dir=run_dir)
    assert [r.info.run_id for r in runs] == [info["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/neg_mse", "lr", "grad_norm"):
        assert _steps(client, info["mlflow_run_id"], key) == list(range(1, epochs + 1)), key


def test_a_failure_on_input_stops_the_retries_of_that_job_only_until_the_next_workflow_run(tmp_path, monkeypatch):
    from tunewise.retries import earlier_input_error, record_input_error

    monkeypatch.chdir(tmp_path)
    job = ["train", "--run-dir", "results/x/baseline", "--attempt", "1"]
    retry = [*job[:-1], "2"]
    other = ["train", "--run-dir", "results/x/seeds/baseline/seed1", "--attempt=2"]
    assert earlier_input_error("train", job, 1) is None and earlier_input_error("train", retry, 2) is None
    record_input_error("train", job, "ValueError: column x: 3 rows are text")
    # Snakemake's retries of that job (attempt 2, 3) stop with the first message; another job is not concerned
    assert earlier_input_error("train", retry, 2) == "ValueError: column x: 3 rows are text"
    assert earlier_input_error("train", [*job[:-1], "3"], 3) == "ValueError: column x: 3 rows are text"
    assert earlier_input_error("train", other, 2) is None
    # the next run of the workflow starts the job at attempt 1: it tries again, and forgets the failure
    assert earlier_input_error("train", job, 1) is None
    assert earlier_input_error("train", retry, 2) is None
