"""The workflow on a real SLURM cluster: Debian's slurm-wlm on localhost (tests/slurm/cluster.sh) with two fake GPUs,
driven by `--workflow-profile profiles/slurm` through snakemake-executor-plugin-slurm.

One Snakemake run serves the checks: the tiny test config's latent experiment up to its diagnosis (data, baseline,
diagnose) and a toy experiment whose baseline is requeued by SLURM half-way and resumes from checkpoints/last.pt.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e_support import env

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
pytestmark = pytest.mark.e2e

TOY = "toy_requeue"
TOY_EPOCHS = 8


def _cannot_run_slurm() -> str | None:
    """Why this machine cannot host the test cluster, or None. Only these reasons skip the test."""
    have = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch"))
    if os.geteuid() != 0:
        return "not root: slurmctld, slurmd and munged cannot be started (and slurm-wlm not installed) here"
    if not have and not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _cannot_run_slurm()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the test cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    assert "gpu:fake:" in gres, f"the cluster has no fake GPUs: {gres!r}"


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["experiments"]["latent_tiny"]["resources"]["gpu_model"] = "fake"
    config["experiments"][TOY] = {
        "trainer": "toy_trainer:ToyTrainer",
        # slow enough (0.5 s an epoch) for the test to requeue the job between two epochs
        "baseline": {"train": {"epochs": TOY_EPOCHS, "sleep": 0.5}},
        "resources": {"threads": 1, "mem_mb": 500, "runtime": 5},
        "finalize": {"max_iterations": 0},  # one optimization round: the loop is test_loop_e2e's
    }
    path = tmp_path / "slurm_test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _jobs_of_run(job_id: str) -> dict[str, str]:
    """Every SLURM job of the Snakemake run that submitted `job_id`, by the comment the plugin gives a job
    (rule and wildcards). The plugin names all jobs of one run after the run's id, which keeps jobs of an
    earlier run on the same cluster (squeue shows them for MinJobAge) out of the answer."""
    name = re.search(r"JobName=(\S+)", _show_job(job_id)).group(1)
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i|%k"],
                         capture_output=True, text=True).stdout
    return {comment: i.strip() for i, _, comment in (line.partition("|") for line in out.splitlines())}


def _show_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _history_steps(run_dir: Path) -> list[int]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [int(float(row["step"])) for row in csv.DictReader(f)]


def _release_requeued(job_id: str) -> None:
    """SLURM makes a requeued job eligible again only two minutes later: once it is pending, start it now."""
    for _ in range(120):
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.25)
    raise AssertionError(f"the requeued job {job_id} never became pending again")


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    targets = ["results/latent_tiny/diagnosis/diagnosis.json", f"results/{TOY}/baseline/metrics.json"]
    cmd = [
        sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"), "-d", str(work),
        "--workflow-profile", str(REPO / "profiles" / "slurm"), "--configfile", str(_config(work)),
        # the test cluster has no accounts, and its jobs take seconds: check on them often
        "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
    ]
    log = (work / "snakemake.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    toy_run = work / "results" / TOY / "baseline"
    requeued = None
    deadline = time.time() + 900
    try:
        # requeue the toy baseline once it has a checkpoint and a few epochs behind it, as a preemption would
        while proc.poll() is None and time.time() < deadline:
            if requeued is None and (toy_run / "checkpoints" / "last.pt").exists() and len(_history_steps(toy_run)) >= 2:
                requeued = json.loads((toy_run / "run.json").read_text())["slurm_job_id"]
                assert requeued, "the toy baseline is not running inside a SLURM job"
                steps_before = _history_steps(toy_run)
                subprocess.run(["scontrol", "requeue", requeued], check=True)
                _release_requeued(requeued)
            time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            pytest.fail("the workflow did not finish on SLURM within 15 minutes")
    finally:
        log.close()
    text = (work / "snakemake.log").read_text()
    assert proc.returncode == 0, text[-6000:]
    assert requeued, "the toy baseline finished before the test could requeue it"
    return work, text, requeued, steps_before


def test_jobs_ran_under_slurm_and_gpu_jobs_asked_for_gpus(slurm_run):
    work, log, _, _ = slurm_run
    run = json.loads((work / "results" / "latent_tiny" / "baseline" / "run.json").read_text())
    assert run["status"] == "done"
    job_id = run["slurm_job_id"]
    assert job_id, "the baseline did not run inside a SLURM job"
    job = _show_job(job_id)
    assert "JobState=COMPLETED" in job, job
    # the experiment's resources.gpus and gpu_model became `--gpus=fake:1`; SLURM gave it one of the two fakes
    assert re.search(r"TresPerJob=\S*gpu:fake:1", job), job
    assert run["cuda_visible_devices"] in ("0", "1")
    # threads and memory came from the experiment's resources
    assert "MinMemoryNode=2000M" in job, job
    # a rule without a GPU asked for none
    jobs = _jobs_of_run(job_id)
    assert jobs["rule_train_baseline_wildcards_latent_tiny"] == job_id
    data_job = _show_job(jobs["rule_prepare_data_wildcards_latent_tiny"])
    assert "JobState=COMPLETED" in data_job and "gpu" not in data_job, data_job
    # the report rules ran on the submitting host, not as cluster jobs
    assert re.search(r"local(rule|checkpoint) diagnose:", log), log[-3000:]
    assert not [comment for comment in jobs if "diagnose" in comment or "resolve_experiment" in comment]
    assert (work / "results" / "latent_tiny" / "diagnosis" / "diagnosis.json").exists()
    assert (work / "reports" / "latent_tiny" / "diagnostic_report.md").exists()


def test_a_requeued_job_resumes_from_its_last_checkpoint(slurm_run):
    work, _, requeued, steps_before = slurm_run
    run_dir = work / "results" / TOY / "baseline"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "done"
    assert run["slurm_job_id"] == requeued  # the same SLURM job, started again by the requeue
    assert run["attempt"] == 2
    assert "Restarts=1" in _show_job(requeued)
    # the second start went on from the checkpoint: every epoch once, the ones before the requeue kept
    steps = _history_steps(run_dir)
    assert steps == list(range(1, TOY_EPOCHS + 1))
    assert steps_before == steps[: len(steps_before)]
    log = (work / "results" / TOY / "logs" / "train_baseline.log").read_text()
    assert "resuming from checkpoints/last.pt" in log
    # one MLflow run for the job, each epoch's metric logged once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(TOY)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.phase = 'baseline'")
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val/neg_mse")
    assert sorted(m.step for m in history) == list(range(1, TOY_EPOCHS + 1))
