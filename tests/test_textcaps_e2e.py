"""The textcaps trainer through the whole workflow (issue 4): a baseline with a learning rate 10x too high
is diagnosed as such with evidence, the targeted config lowers it, and every report shows per-group
accuracy, the group curves and a confusion matrix, read from files the workflow wrote."""
from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from e2e_support import snakemake

pytestmark = pytest.mark.e2e

BAD_LR = 0.01  # the trainer's default is 1e-3
# small enough for CI, large enough that the 10x learning rate shows in the update ratio
GENERATOR = {"n_train": 400, "n_val": 200, "n_test": 200, "image_size": 32}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("textcaps")
    cfg = {"experiments": {"tc_bad_lr": {
        "trainer": "textcaps",
        "device": "cpu",
        "data": {"source": "embedded", "generator": GENERATOR},
        "baseline": {"optim": {"lr": BAD_LR}, "train": {"epochs": 8}},
        # the tiny data adds over/underfitting findings, so auto would choose a sweep: targeted keeps it short
        "optimize": {"strategy": "targeted", "max_recommendations": 2},
        "significance": {"seeds": 2, "n_boot": 200},
        "finalize": {"max_iterations": 0},  # one round: the loop is test_loop_e2e's
        "resources": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    }}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def test_too_high_learning_rate_is_named_with_evidence(workflow):
    import pandas as pd

    res = workflow / "results" / "tc_bad_lr"
    diag = json.loads((res / "diagnosis" / "diagnosis.json").read_text())
    lr_findings = [f for f in diag["findings"] if f["root_cause"] == "lr_too_high"]
    assert lr_findings, diag["findings"]
    assert all(f["evidence"] for f in lr_findings)
    # the GroupDRO warm-up's switch of objective is not read as a rising loss
    metrics = json.loads((res / "baseline" / "metrics.json").read_text())
    assert metrics["objective_from_step"] == 3
    assert all(f["evidence"].get("min_step", 3) >= 3 for f in lr_findings)
    assert "large_updates" in {f["id"] for f in lr_findings}
    ratio = next(f for f in lr_findings if f["id"] == "large_updates")["evidence"]["update_ratio_median"]
    history = pd.read_csv(res / "baseline" / "history.csv")
    assert ratio == pytest.approx(float(history["update_ratio"].median())) and ratio > 0.01
    lr_change = [c for c in diag["changes"] if c["key"] == "optim.lr"]
    assert lr_change and lr_change[0]["old"] == BAD_LR and lr_change[0]["new"] < BAD_LR
    report = (workflow / "reports" / "tc_bad_lr" / "diagnostic_report.md").read_text()
    assert "lr_too_high" in report and "optim.lr" in report
    opt = yaml.safe_load((res / "diagnosis" / "optimization_config.yaml").read_text())
    assert opt["optim"]["lr"] == lr_change[0]["new"]


def _cell(text: str, row: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_reports_show_per_group_accuracy_from_the_run_files(workflow):
    import pandas as pd

    res, reports = workflow / "results" / "tc_bad_lr", workflow / "reports" / "tc_bad_lr"
    base = json.loads((res / "baseline" / "metrics.json").read_text())
    history = pd.read_csv(res / "baseline" / "history.csv")
    at_best = history[history["step"] == base["best_step"]].iloc[0]
    diag_text = (reports / "diagnostic_report.md").read_text()
    for group in ("majority", "minority"):
        assert float(_cell(diag_text, group)[0]) == pytest.approx(at_best[f"val/acc/{group}"], abs=5e-4)
    assert float(_cell(diag_text, "**worst_group_acc**")[0]) == pytest.approx(base["primary"]["best"], abs=5e-4)
    for name in ("baseline_groups.png", "baseline_confusion.png"):
        assert f"](plots/{name})" in diag_text and (reports / "plots" / name).stat().st_size > 5000
    confusion = json.loads((res / "baseline" / "confusion_val.json").read_text())
    assert sorted(int(s) for s in confusion["steps"]) == list(range(1, base["epochs_run"] + 1))
    assert sum(map(sum, confusion["steps"][str(base["best_step"])])) == GENERATOR["n_val"]  # every validation image once

    opt_text = (reports / "optimization_results.md").read_text()
    assert "## Per-group accuracy" in opt_text and "| group | baseline | optimized |" in opt_text

    final = json.loads((res / "final" / "final.json").read_text())
    final_text = (reports / "final_report.md").read_text()
    assert "| group | validation | test |" in final_text
    for group in ("majority", "minority"):
        assert float(_cell(final_text, group)[1]) == pytest.approx(final["test"][f"test/acc/{group}"], abs=5e-4)
    test_confusion = json.loads((res / "final" / "test" / "confusion_test.json").read_text())
    assert sum(map(sum, test_confusion["matrix"])) == final["test"]["test/n"] == GENERATOR["n_test"]
    assert "(test)" in final_text and (reports / "plots" / "final_confusion.png").exists()
    assert "confusion" not in final["test"]  # a table, not a metric


def test_mlflow_has_per_group_histories(workflow):
    client = MlflowClient(tracking_uri=f"sqlite:///{workflow / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tc_bad_lr")
    runs = client.search_runs([exp.experiment_id], "tags.phase = 'baseline'")
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val/acc/minority")
    assert [m.step for m in history] == list(range(1, 9))
    assert client.get_metric_history(runs[0].info.run_id, "q/minority")


def test_nothing_to_do_afterwards(workflow):
    proc = snakemake(workflow, "-n", "--cores", "2", configfile=workflow / "config.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
