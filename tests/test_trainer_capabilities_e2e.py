"""A trainer's optional capabilities (trainers/base.py: Capabilities) reach every phase without the phases or the
workflow naming the trainer: tests/toy_trainer.py's CapableToy declares a preparation step, a finding and a
recommendation of its own, a threshold of its own, a test table and a report section, and goes through the
whole workflow once."""
from __future__ import annotations

import json

import pytest

from e2e_support import TOY_RESOURCES, mlflow_runs, snakemake, write_config

pytestmark = pytest.mark.e2e

CAPABLE = "toy_trainer:CapableToy"


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("capable")
    write_config(work / "config.yaml", {"cap": {
        "trainer": CAPABLE, "baseline": {"train": {"epochs": 4}}, "optimize": {"strategy": "targeted"},
        "significance": {"seeds": 2, "n_boot": 200}, "resources": TOY_RESOURCES}})
    dry = snakemake(work, "-n", "--cores", "2", configfile=work / "config.yaml")
    assert dry.returncode == 0, dry.stderr[-3000:]
    proc = snakemake(work, "--cores", "2", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work, dry.stdout + dry.stderr


def test_the_declared_preparation_step_is_a_job_before_training(workflow):
    work, dry = workflow
    assert "rule prepare_step:" in dry and "results/cap/data/warmup/step.json" in dry
    res = work / "results" / "cap" / "data"
    assert json.loads((res / "warmup" / "warmup.json").read_text()) == {"threads": 1}
    step = json.loads((res / "warmup" / "step.json").read_text())
    assert step["step"] == "warmup" and step["metrics"] == {"warmup/value": 1.5}
    # every training job waited for it: the step's marker is older than the baseline's first history row
    assert (res / "warmup" / "step.json").stat().st_mtime <= (work / "results/cap/baseline/history.csv").stat().st_mtime
    client, runs = mlflow_runs(work, "cap")
    warmup = [r for r in runs if r.info.run_name == "warmup"]
    assert len(warmup) == 1 and warmup[0].data.metrics["warmup/value"] == 1.5
    assert [a.path for a in client.list_artifacts(warmup[0].info.run_id)] == ["warmup.json"]


def test_the_trainers_finding_and_recommendation_drive_the_patch(workflow):
    work, _ = workflow
    diag = json.loads((work / "results/cap/diagnosis/diagnosis.json").read_text())
    own = [f for f in diag["findings"] if f["id"] == "toy_flag"]
    assert own and own[0]["evidence"]["toy_dropout_max"] == 0.05  # its own threshold reached its rule
    rec = [r for r in diag["recommendations"] if r["finding_id"] == "toy_flag"]
    assert rec and rec[0]["knob"] == "weight_decay"
    assert diag["patch"]["optim.weight_decay"] == 0.001
    report = (work / "reports/cap/diagnostic_report.md").read_text()
    assert "toy_flag" in report and "the toy's own recommendation" in report


@pytest.mark.parametrize("report, runs", [("diagnostic_report.md", "baseline"),
                                          ("optimization_results.md", "baseline, optimized"),
                                          ("final_report.md", "validation")])
def test_every_report_carries_the_trainers_section(workflow, report, runs):
    work, _ = workflow
    text = (work / "reports" / "cap" / report).read_text()
    kind = {"diagnostic_report.md": "diagnostic", "optimization_results.md": "optimization",
            "final_report.md": "final"}[report]
    assert f"## Toy section ({kind})\n\nruns: {runs};" in text
    if kind == "final":
        assert 'test table: {"rows": [[1, 2], [3, 4]]}' in text


def test_the_test_tables_are_files_beside_final_json_not_metrics(workflow):
    work, _ = workflow
    final = json.loads((work / "results/cap/final/final.json").read_text())
    assert set(final["test"]) == {"test/neg_mse"}
    assert json.loads((work / "results/cap/final/test/toy_table.json").read_text()) == {"rows": [[1, 2], [3, 4]]}
    client, runs = mlflow_runs(work, "cap")
    final_run = [r for r in runs if r.info.run_name == "final"]
    assert len(final_run) == 1
    assert [a.path for a in client.list_artifacts(final_run[0].info.run_id, "test")] == ["test/toy_table.json"]


def test_every_rule_that_writes_a_config_report_or_gate_logs_it_once(workflow):
    """resolve, the gates (checklists as artifacts) and report_index log to the experiment's one `workflow` run;
    a job that runs again replaces its files there and adds no run."""
    work, _ = workflow
    again = snakemake(work, "--cores", "1", "--forcerun", "report_index", configfile=work / "config.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    client, runs = mlflow_runs(work, "cap")
    flows = [r for r in runs if r.info.run_name == "workflow"]
    assert len(flows) == 1 and flows[0].info.status == "FINISHED"
    run_id = flows[0].info.run_id

    def listed(folder=None):
        return {a.path for a in client.list_artifacts(run_id, folder)}

    assert {"experiment.yaml", "gates", "reports"} <= listed()
    assert listed("gates") == {"gates/diagnostics.json", "gates/optimization_complete.json"}
    assert {"reports/checklists/diagnostics.md", "reports/checklists/optimization_complete.md"} <= listed("reports/checklists")
    assert "reports/index.md" in listed("reports")
    assert "reports/plots/index_overview.png" in listed("reports/plots")  # where index.md's link points


def test_every_training_run_records_its_data_as_a_dataset_input(workflow):
    work, _ = workflow
    client, runs = mlflow_runs(work, "cap")
    trained = [r for r in runs if "seed" in r.data.params]  # every training run logs its seed
    # baseline, targeted, 2 + 2 seed runs (the experiment's seed adopts the baseline's and the targeted run), final
    assert len(trained) >= 4, [r.info.run_name for r in trained]
    for r in trained:
        inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1, r.info.run_name
        assert inputs[0].dataset.name == "cap-data" and inputs[0].dataset.source_type == "local"
        assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "train")]
        assert json.loads(inputs[0].dataset.source)["uri"].endswith("results/cap/data")
