"""The bring-your-own-trainer example (examples/) through the whole workflow, to the final report.

`examples/config.yaml` names `trainer: examples.my_trainer:MyTrainer`, a trainer outside the package. The
workflow runs in a temporary work directory with the repository's Snakefile, as a user's project would.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXP = "my_regressor"
pytestmark = pytest.mark.e2e


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the work directory is not the repository root, so `examples` is found through the path (a user's own
    # trainer module sits in the directory they run Snakemake from, or on PYTHONPATH)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("example")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--workflow-profile", str(REPO / "profiles" / "default"),
           "--configfile", str(REPO / "examples" / "config.yaml"), "--cores", "2", "--resources", "gpu=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return work


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_final_report_names_the_example_metric_and_its_test_value(finished):
    results, reports = finished / "results" / EXP, finished / "reports" / EXP
    final = _json(results / "final" / "final.json")
    test_rmse = final["test"]["test/rmse"]
    assert math.isfinite(test_rmse) and test_rmse > 0
    report = (reports / "final_report.md").read_text(encoding="utf-8")
    assert "`test/rmse`" in report and f"{test_rmse:.4g}" in report
    for path in final["checkpoints"].values():
        assert (finished / path).is_file(), path
    assert (finished / "reports" / "index.md").is_file()


def test_final_run_metrics_have_a_finite_primary_metric(finished):
    run = finished / "results" / EXP / "final" / "run"
    metrics = _json(run / "metrics.json")
    assert metrics["primary"]["name"] == "val/rmse" and metrics["primary"]["direction"] == "min"
    assert math.isfinite(metrics["primary"]["best"])
    # the history has what the diagnosis reads: both loss curves, the primary metric, lr and gradient norms
    history = pd.read_csv(run / "history.csv")
    assert {"train/loss", "val/loss", "train/rmse", "val/rmse", "lr", "grad_norm"} <= set(history.columns)
    assert len(history) == metrics["epochs_run"] == yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"]
    assert history["val/rmse"].min() == pytest.approx(metrics["primary"]["best"])


def test_diagnosis_optimisation_and_decision_act_on_the_example(finished):
    results, reports = finished / "results" / EXP, finished / "reports" / EXP
    diagnosis = _json(results / "diagnosis" / "diagnosis.json")
    # the example's baseline learns too slowly on purpose (examples/config.yaml): the diagnosis must see it
    assert "lr_too_low" in {f["root_cause"] for f in diagnosis["findings"]}
    baseline = yaml.safe_load((results / "baseline" / "config.yaml").read_text())
    patched = yaml.safe_load((results / "diagnosis" / "optimization_config.yaml").read_text())
    assert patched["optim"]["lr"] > baseline["optim"]["lr"] or patched["train"]["epochs"] > baseline["train"]["epochs"]
    decision = _json(results / "significance" / "decision.json")
    assert decision["option"] in ("A", "B", "C", "D") and decision["chosen_side"] in ("baseline", "optimized")
    assert _json(results / "final" / "final.json")["chosen_side"] == decision["chosen_side"]
    summary = (reports / "optimization_results.md").read_text(encoding="utf-8")
    assert "examples.my_trainer:MyTrainer" in summary and "`val/rmse`" in summary
    assert f"Option {decision['option']}" in summary
    sig = _json(results / "significance" / "significance.json")
    assert len(sig["baseline"]["values"]) == 3 and all(math.isfinite(v) for v in sig["baseline"]["values"])


def test_mlflow_holds_the_example_runs(finished):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{finished / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    assert {"baseline", "diagnose", "seed", "significance", "final"} <= {r.data.tags.get("phase") for r in runs}
    baseline = next(r for r in runs if r.data.tags.get("phase") == "baseline")
    epochs = client.get_metric_history(baseline.info.run_id, "val/rmse")
    metrics = _json(finished / "results" / EXP / "baseline" / "metrics.json")
    assert [m.step for m in sorted(epochs, key=lambda m: m.step)] == list(range(1, metrics["epochs_run"] + 1))
    final = next(r for r in runs if r.data.tags.get("phase") == "final")
    assert final.data.metrics["test/rmse"] == pytest.approx(_json(finished / "results" / EXP / "final" / "final.json")
                                                            ["test"]["test/rmse"])
