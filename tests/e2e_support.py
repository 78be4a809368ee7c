"""What the end-to-end tests share: the Snakemake command they run the workflow with, the environment its jobs
get, a config written from experiments, and the MLflow runs of an experiment. conftest.py puts tests/ on the
path, so test files import it as `e2e_support`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# the trainer the mechanics tests (sweep, iterative, kills, faults) run on: seconds per run, no data to featurise
TOY = "toy_trainer:ToyTrainer"
TOY_RESOURCES = {"threads": 1, "mem_mb": 500, "runtime": 5}


def env(extra: dict | None = None) -> dict:
    """A job's environment: no tracking URI of the caller's, this Python's scripts first, and tests/ importable
    (configs name tests' toy_trainer:ToyTrainer)."""
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    # kept after tests/: a PYTHONPATH naming a source tree (a work tree's src/) is the code the jobs should run
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), out.get("PYTHONPATH")) if p)
    out.update(extra or {})
    return out


def snakemake_cmd(workdir: Path, *args: str, configfile: Path | None = None, profile: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    if profile:
        cmd += ["--workflow-profile", str(REPO / "profiles" / "default")]
    return [*cmd, "--configfile", str(configfile or REPO / "config" / "test.yaml"), *args]


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900, extra_env=None):
    return subprocess.run(snakemake_cmd(workdir, *args, configfile=configfile), capture_output=True, text=True,
                          timeout=timeout, env=env(extra_env))


def ctrl_c_reaches(*_) -> None:
    """preexec_fn for a workflow the test stops with SIGINT: a shell's background job (`cmd &` without job
    control) starts with SIGINT ignored and passes that on to every child, where Ctrl-C would then do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_round(experiments: dict) -> dict:
    """Experiments that do not set finalize.max_iterations run one optimization round: each e2e file tests
    its own machinery in a fixed number of jobs, and seed 004's loop over rounds is test_loop_e2e's."""
    for exp in experiments.values():
        exp.setdefault("finalize", {}).setdefault("max_iterations", 0)
    return experiments


def write_config(path: Path, experiments: dict) -> Path:
    path.write_text(yaml.safe_dump({"experiments": one_round(experiments)}))
    return path


def mlflow_runs(work: Path, exp: str):
    """The MLflow client of a work directory's database and every run of experiment `exp`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(exp)
    assert experiment is not None, f"no MLflow experiment {exp!r}"
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def readme_config(name: str, data_path: Path | str) -> dict:
    """The config the README gives under `<!-- config: name -->` (the ```yaml block right after that marker), as
    written, with only its one experiment's `data.path` pointed at `data_path` (and one optimization round unless
    it sets finalize.max_iterations: `one_round`): the bring-your-own-data tests run what a user would copy."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- config: {re.escape(name)} -->\s*```yaml\n(.*?)```", text, re.S)
    assert found, f"README.md has no ```yaml block after <!-- config: {name} -->"
    config = yaml.safe_load(found.group(1))
    (exp,) = config["experiments"].values()
    assert "path" in exp.get("data", {}), f"README config {name!r} has no data.path to point at the fixture"
    exp["data"]["path"] = str(data_path)
    one_round(config["experiments"])
    return config
