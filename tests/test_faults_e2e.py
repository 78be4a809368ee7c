"""Faults through Snakemake, on the toy trainer (tests/toy_trainer.py): a training job that runs out of memory
is retried with half the batch. The whole workflow killed at several points and run again is
test_kills_e2e.py's table of kill points."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e_support import TOY, TOY_RESOURCES, mlflow_runs, snakemake

pytestmark = pytest.mark.e2e


# --- a failure on input is not retried ------------------------------------------------------------------------


def test_a_job_that_fails_on_its_input_is_not_trained_again_by_snakemakes_retries(tmp_path):
    cfg = {"experiments": {"bad": {"trainer": TOY, "resources": TOY_RESOURCES,  # resources.retries: the default, 2
                                   "baseline": {"train": {"epochs": 3, "refuse_data_at_epoch": 2}}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "results/bad/baseline/metrics.json", configfile=tmp_path / "bad.yaml",
                     timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("Trying to restart job") == 2  # Snakemake still starts the two retries ...
    log = (tmp_path / "results" / "bad" / "logs" / "train_baseline.log").read_text()
    # ... and the last one stopped at once, naming the first attempt's failure, without training
    assert "not retried: an earlier attempt failed on its input" in log
    assert "the data of epoch 2 are unusable (column x: 3 rows are text)" in log
    info = json.loads((tmp_path / "results" / "bad" / "baseline" / "run.json").read_text())
    assert info["status"] == "failed" and info["attempt"] == 1  # one start trained; the retries never began one
    _, runs = mlflow_runs(tmp_path, "bad")
    assert len([r for r in runs if r.data.tags.get("phase") == "baseline"]) == 1


# --- out of memory -------------------------------------------------------------------------------------------


def test_out_of_memory_is_retried_by_snakemake_with_half_the_batch(tmp_path):
    cfg = {"experiments": {"oom": {"trainer": TOY, "resources": TOY_RESOURCES,  # resources.retries: the default, 2
                                   "baseline": {"train": {"epochs": 3, "batch_size": 32, "oom_above_batch": 16}}}}}
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "results/oom/baseline/metrics.json", configfile=tmp_path / "oom.yaml",
                     timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the first attempt failed with the reason in its log (Snakemake shows failed logs), then was retried
    assert "out of memory at train.batch_size=32 (OutOfMemoryError: CUDA out of memory." in out
    assert "retrying with a smaller batch, train.batch_size=16" in out and "Trying to restart job" in out
    assert "mem_mb=1000" in out  # the retry also gets twice the memory

    run_dir = tmp_path / "results" / "oom" / "baseline"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["attempt"] == 2
    assert info["batch_size"] == {"key": "train.batch_size", "configured": 32, "used": 16}
    assert [(e["status"], e["batch_size"]["used"]) for e in info["earlier"]] == [("failed", 32)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 16
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "done"
    assert "train.batch_size=16 instead of 32" in (tmp_path / "results" / "oom" / "logs" / "train_baseline.log").read_text()

    # MLflow: the attempt that ran out of memory is a failed run saying why; the retry the run that counts
    _, runs = mlflow_runs(tmp_path, "oom")
    runs = [r for r in runs if r.data.tags.get("phase") == "baseline"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(failed) == 1 and len(done) == 1 and len(runs) == 2
    assert failed[0].data.tags["status"] == "failed" and "out of memory" in failed[0].data.tags["reason"]
    assert done[0].info.run_id == info["mlflow_run_id"] and done[0].data.params["train.batch_size"] == "16"
    assert done[0].data.tags["retry_of"] == failed[0].info.run_id
