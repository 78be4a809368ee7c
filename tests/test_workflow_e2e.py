"""The whole workflow, run by Snakemake on the tiny test config, on the CPU.

One module-scoped run serves the output checks; the malformed-config tests use workflows of their own
(Ctrl-C during the baseline and resuming is a row of test_kills_e2e.py's table of kill points).
"""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from e2e_support import REPO, env, snakemake

EXP = "latent_tiny"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return work, proc


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dry_run_lists_every_phase_rule(tmp_path):
    proc = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rule in ("resolve_experiment", "prepare_data", "train_baseline", "diagnose", "seed_run", "all"):
        assert rule in proc.stdout, rule
    # rules below the diagnose checkpoint are known to Snakemake even before it ran
    listed = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                             "--configfile", str(REPO / "config" / "test.yaml"), "--list-rules"],
                            capture_output=True, text=True, env=env())
    for rule in ("optimize_targeted", "significance", "gate", "finalize", "design", "report_index"):
        assert rule in listed.stdout, rule


def test_lint_has_no_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--configfile", str(REPO / "config" / "test.yaml"), "--lint"],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_reports_exist_and_quote_the_run_files(finished):
    work, _ = finished
    reports, results = work / "reports" / EXP, work / "results" / EXP
    for name in ("diagnostic_report.md", "optimization_results.md", "significance.md", "final_report.md",
                 "checklists/diagnostics.md", "checklists/optimization_complete.md"):
        assert (reports / name).exists(), name
    assert (work / "reports" / "index.md").exists()
    baseline = _metrics(results / "baseline" / "metrics.json")
    diag = (reports / "diagnostic_report.md").read_text()
    assert f"{baseline['primary']['best']:.4g}" in diag
    sig = _metrics(results / "significance" / "significance.json")
    results_md = (reports / "optimization_results.md").read_text()
    assert f"{sig['baseline']['mean']:.4g}" in results_md
    for path in sig["baseline"]["runs"]:
        value = _metrics(Path(work / path) / "metrics.json")["primary"]["best"]
        assert value in sig["baseline"]["values"]
    decision = _metrics(results / "significance" / "decision.json")
    assert decision["option"] in "ABCD" and f"Option {decision['option']}" in results_md or decision["option"] in results_md
    checklist = (reports / "checklists" / "optimization_complete.md").read_text()
    assert "- [ ]" not in checklist.split("required")[0] or "(required)" not in checklist
    final = _metrics(results / "final" / "final.json")
    side = final["chosen_side"]  # the checkpoints are named after the side that won
    assert {k: Path(v).name for k, v in final["checkpoints"].items()} == {"best": f"best_model_{side}.pt",
                                                                          "last": f"last_model_{side}.pt"}
    assert sorted(p.name for p in (results / "final").glob("*.pt")) == [f"best_model_{side}.pt", f"last_model_{side}.pt"]
    assert (results / "final" / "final_config.yaml").exists()
    assert "test/r2_mean" in final["test"]


def test_mlflow_holds_phase_runs_with_epoch_histories(finished):
    from mlflow.tracking import MlflowClient

    work, _ = finished
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXP)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=200)
    phases = {r.data.tags.get("phase") for r in runs}
    assert {"baseline", "diagnose", "seed", "significance", "final"} <= phases
    baseline = next(r for r in runs if r.data.tags.get("phase") == "baseline")
    hist = pd.read_csv(work / "results" / EXP / "baseline" / "history.csv")
    logged = client.get_metric_history(baseline.info.run_id, "val/r2_mean")
    assert sorted(m.step for m in logged) == list(hist["step"])
    assert [round(m.value, 6) for m in sorted(logged, key=lambda m: m.step)] == [round(v, 6) for v in hist["val/r2_mean"]]
    assert baseline.data.tags["trainer"] == "latent" and baseline.data.tags["rule"] == "train_baseline"
    assert len(baseline.data.tags["config_hash"]) == 12
    parent = next(r for r in runs if r.data.tags.get("phase") == "significance")
    seeds = [r for r in runs if r.data.tags.get("phase") == "seed"]
    assert seeds and all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in seeds)


def test_same_config_and_seed_is_trained_once(finished):
    """The baseline is the baseline side's seed 0, the targeted run the optimized side's, and the final run
    the chosen side's: adopted, not trained again, and still complete runs in the files and in MLflow."""
    from mlflow.tracking import MlflowClient

    work, _ = finished
    results = work / "results" / EXP
    diag = _metrics(results / "diagnosis" / "diagnosis.json")
    decision = _metrics(results / "significance" / "decision.json")
    pairs = [(results / "baseline", results / "seeds" / "baseline" / "seed0")]
    if diag["strategy"]["chosen"] == "targeted":
        pairs.append((results / "optimize" / "targeted", results / "seeds" / "optimized" / "seed0"))
    pairs.append((results / "seeds" / decision["chosen_side"] / "seed0", results / "final" / "run"))
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    for source, copy in pairs:
        info = _metrics(copy / "run.json")
        assert info["status"] == "done" and (work / info["reused_from"]).resolve() == source.resolve()
        assert (copy / "history.csv").read_text() == (source / "history.csv").read_text()
        src_metrics, copy_metrics = _metrics(source / "metrics.json"), _metrics(copy / "metrics.json")
        assert copy_metrics["primary"] == src_metrics["primary"] and copy_metrics["best_step"] == src_metrics["best_step"]
        assert (copy / "checkpoints" / "best.pt").read_bytes() == (source / "checkpoints" / "best.pt").read_bytes()
        logged = client.get_metric_history(info["mlflow_run_id"], "val/r2_mean")
        assert sorted(m.step for m in logged) == list(pd.read_csv(copy / "history.csv")["step"])
        # one training log line per adopted run: it did not train
        assert "adopted its finished run" in (results / "logs" / _log_name(copy)).read_text()
    # seeds other than the experiment's own are trained
    assert "reused_from" not in _metrics(results / "seeds" / "baseline" / "seed1" / "run.json")


def test_design_ends_the_latent_experiment_with_a_report_from_its_files(finished):
    """The design rule ran on the final model: design.json holds every restart, the report names the best
    designs with their predicted properties, round trip and nearest known compounds from that file, and the
    run is in MLflow under the final run."""
    from mlflow.tracking import MlflowClient

    work, _ = finished
    results, reports = work / "results" / EXP, work / "reports" / EXP
    design = _metrics(results / "design" / "design.json")
    final = _metrics(results / "final" / "final.json")
    assert design["checkpoint"] == final["checkpoints"]["best"]
    assert design["settings"]["restarts"] == 16 and design["settings"]["constraints"] == [{"task": "S_p", "min": 100}]
    assert len(design["restarts"]) == design["summary"]["restarts"]
    assert [r["alpha"] for r in design["alpha_study"]] == [0.0, 0.5, 1.0]
    text = (reports / "design_report.md").read_text()
    passed = [r for r in design["restarts"] if r["ok"]]
    if passed:
        best = passed[0]
        assert best["predicted"]["S_p"] >= 100 * (1 - 1e-3)  # the constraint, in physical units
        assert f"restart {best['restart']}" in text
        assert f"PF_p = {best['predicted_roundtrip']['PF_p']:.4g}" in text
        assert best["neighbours"][0]["formula"] in text and best["neighbours"][0]["id"] in text
    else:
        assert "no design passed the round-trip check" in text
    for row in design["alpha_study"]:
        assert f"| {row['alpha']:.4g} | {100 * row['off_manifold_rate']:.4g}% |" in text
    for plot in ("design_trajectories.png", "design_scores.png", "design_vs_known_PF_p.png", "design_alpha_study.png"):
        assert (reports / "plots" / plot).stat().st_size > 1000 and f"plots/{plot}" in text
    assert "design report" in (work / "reports" / "index.md").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXP)
    runs = client.search_runs([exp.experiment_id], "tags.phase = 'design'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    final_run = _metrics(results / "final" / "run" / "run.json")["mlflow_run_id"]
    assert runs[0].data.tags["mlflow.parentRunId"] == final_run
    assert runs[0].data.metrics["design/restarts"] == design["summary"]["restarts"]
    assert runs[0].data.params["design.alpha"] == str(design["settings"]["alpha"])


def _log_name(run_dir: Path) -> str:
    if run_dir.name == "run":
        return "finalize.log"
    return f"seed_run_{run_dir.parent.name}_{run_dir.name[len('seed'):]}.log"


def test_nothing_to_do_after_a_finished_run(finished):
    work, _ = finished
    proc = snakemake(work, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _report_data(html: str, name: str):
    """A JSON object the report's script reads: Snakemake 9 writes `var results = {...};` (every flagged file under
    its path, embedded as a base64 data URI, with its rendered caption) and `var categories = {...};` (the paths
    by category and subcategory) on lines of their own."""
    # an object literal: the bundled JS libraries declare a `var results` of their own
    match = re.search(rf"^\s*var {name} = (\{{.*\}});\s*$", html, re.MULTILINE)
    assert match, f"no `var {name}` in the report"
    return json.loads(match.group(1))


def test_html_report_embeds_every_report_and_plot_by_experiment_and_phase(finished, tmp_path):
    from tunewise.reports.render import REPORT_NAMES

    work, _ = finished
    html = tmp_path / "report.html"
    proc = snakemake(work, "--report", str(html))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = html.read_text()
    assert "tunewise takes each experiment" in text  # the front page: workflow/report/workflow.rst
    categories, results = _report_data(text, "categories"), _report_data(text, "results")
    exp, plots = f"reports/{EXP}", f"reports/{EXP}/plots"
    assert {cat: {sub: set(paths) for sub, paths in subs.items()} for cat, subs in categories.items()} == {
        EXP: {
            "Phase 2: baseline": {f"{plots}/baseline_curves.png"},
            "Phase 3: diagnosis": {f"{exp}/diagnostic_report.md"},
            "Phase 4: optimization": {f"{exp}/optimization_results.md", f"{plots}/rounds.png", f"{exp}/round_results.md",
                                      f"{plots}/curves_comparison.png"},
            "Significance": {f"{exp}/significance.md", f"{plots}/seed_scores.png"},
            "Phase 5: finalization": {f"{exp}/final_report.md"},
            "Design": {f"{exp}/design_report.md", f"{plots}/design_trajectories.png", f"{plots}/design_scores.png"},
        },
        "Overview": {"All experiments": {"reports/index.md", "reports/plots/index_overview.png"}},
    }
    # every markdown report this run wrote is inside, not only the ones this test names
    assert {f"{exp}/{name}" for name in REPORT_NAMES if (work / exp / name).exists()} <= set(results)
    assert set(results) == {path for subs in categories.values() for paths in subs.values() for path in paths}
    for path, entry in results.items():
        # the very bytes the workflow wrote, not a link to them: the HTML stands alone
        embedded = base64.b64decode(entry["data_uri"].split(";base64,", 1)[1])
        assert embedded == (work / path).read_bytes(), path
        if path.endswith(".png"):
            assert entry["mime_type"] == "image/png", path
        else:  # .md: text/markdown where the system's mime.types knows it, Snakemake's text/plain elsewhere
            assert entry["mime_type"].startswith("text/"), path
        # the captions are rendered for the job that wrote the file: an experiment's name its own
        assert entry["caption"].strip(), path
        if path.startswith(f"{exp}/"):
            assert EXP in entry["caption"], path


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"trainer": "resnet9000"}, "experiments.bad.trainer"),
        ({"significance": {"seeds": "five"}}, "experiments.bad.significance.seeds"),
        ({"data": {"source": "path", "path": "/nonexistent/table.csv", "targets": ["y"]}}, "data.path: file not found"),
    ],
)
def test_malformed_configs_stop_before_any_job(tmp_path, change, needle):
    exp = {"trainer": "latent", **change}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"experiments": {"bad": exp}}))
    proc = snakemake(tmp_path, "--cores", "1", configfile=cfg)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()
