"""The pez trainer through the whole workflow (issue 5): shapes data, the tiny CLIP (its preparation step `clip`),
baseline, diagnosis, optimisation, significance and finalisation, with reports that show the prompts found,
the similarity curve and the target images, all read from files the workflow wrote."""
from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from e2e_support import snakemake

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("pez")
    cfg = {"experiments": {"pez_tiny": {
        "trainer": "pez",
        "device": "cpu",
        "data": {"source": "embedded", "generator": {"n_train": 600, "n_val": 40, "n_test": 40},
                 "n_targets": 8, "clip": {"train": {"epochs": 3, "batch_size": 64}}},
        "baseline": {"pez": {"lr": 0.01, "iter": 20, "prompt_len": 6}, "train": {"report_every": 2, "random_prompts": 16}},
        # a sweep over the trainer's space (pez.lr, weight_decay, prompt_len, prompt_bs), pruned in PEZ steps
        "optimize": {"strategy": "sweep", "sweep": {"n_trials": 3, "sampler": "random", "pruner": "median"}},
        "significance": {"seeds": 2, "n_boot": 200},
        "finalize": {"max_iterations": 0},  # one round: the loop is test_loop_e2e's
        "resources": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    }}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def test_tiny_clip_is_trained_once_before_the_baseline_and_tracked(workflow):
    res = workflow / "results" / "pez_tiny"
    clip = json.loads((res / "data" / "clip" / "clip_metrics.json").read_text())
    assert clip["model"] == "tunewise-tiny-clip" and clip["epochs"] == 3
    assert (res / "data" / "clip" / "tiny_clip.pt").is_file()
    assert 0 < clip["retrieval_val_test"]["image_to_caption_top5"] <= 1
    client = MlflowClient(f"sqlite:///{workflow / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pez_tiny")
    # the pez trainer's declared preparation step `clip`: one job, one MLflow run named after the step
    assert json.loads((res / "data" / "clip" / "step.json").read_text())["step"] == "clip"
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'clip'")
    assert len(runs) == 1
    assert runs[0].data.metrics["clip/image_to_caption_top5"] == pytest.approx(
        clip["retrieval_val_test"]["image_to_caption_top5"])
    # the baseline's history counts PEZ steps
    base = json.loads((res / "baseline" / "metrics.json").read_text())
    assert base["epochs_planned"] == 20 and base["status"] == "done"
    # seed 0 of the baseline side adopted the baseline run, its target images included
    adopted = json.loads((res / "seeds" / "baseline" / "seed0" / "metrics.json").read_text())
    assert adopted["reused_from"].endswith("baseline")
    prompts = json.loads((res / "seeds" / "baseline" / "seed0" / "prompts.json").read_text())["targets"]
    assert all((res / "seeds" / "baseline" / "seed0" / t["image"]).is_file() for t in prompts)


def test_sweep_tunes_pez_knobs_with_the_step_budget(workflow):
    res = workflow / "results" / "pez_tiny"
    # the sweep starts from the diagnosis' config (optimize.sweep.base: optimized)
    base = yaml.safe_load((res / "diagnosis" / "optimization_config.yaml").read_text())
    space = {"lr", "weight_decay", "prompt_len", "prompt_bs"}
    trials = sorted((res / "optimize" / "sweep" / "trials").glob("trial*/config.yaml"))
    assert len(trials) == 3
    for path in trials:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["pez"]["iter"] == base["pez"]["iter"]  # the budget key of the pez trainer
        changed = {k for k in cfg["pez"] if cfg["pez"][k] != base["pez"][k]}
        assert changed and changed <= space, changed
        assert {k: v for k, v in cfg.items() if k != "pez"} == {k: v for k, v in base.items() if k != "pez"}
    best = yaml.safe_load((res / "optimize" / "sweep" / "best.yaml").read_text())
    assert any(best["pez"] == yaml.safe_load(p.read_text())["pez"] for p in trials)
    assert (res / "significance" / "decision.json").is_file()
    # a pruned trial stopped at a PEZ step before the budget
    for trial in (res / "optimize" / "sweep" / "trials").glob("trial*/trial.json"):
        record = json.loads(trial.read_text())
        if record.get("state") == "PRUNED":
            metrics = json.loads((trial.parent / "metrics.json").read_text())
            assert metrics["best_step"] < base["pez"]["iter"]


def test_reports_show_prompts_curve_and_images(workflow):
    res, reports = workflow / "results" / "pez_tiny", workflow / "reports" / "pez_tiny"
    prompts = json.loads((res / "baseline" / "prompts.json").read_text())["targets"]
    diag_text = (reports / "diagnostic_report.md").read_text()
    assert "## Prompts found (val split, baseline run)" in diag_text
    assert "The CLIP is the embedded `tunewise-tiny-clip`" in diag_text and "held-out images" in diag_text
    for t in prompts:
        assert f"`{t['prompt']}`" in diag_text and t["caption"] in diag_text
    for name in ("baseline_similarity.png", "baseline_prompts.png"):
        assert f"](plots/{name})" in diag_text and (reports / "plots" / name).stat().st_size > 5000
    assert "](../../results/pez_tiny/baseline/targets/val-000000.png)" in diag_text
    opt_text = (reports / "optimization_results.md").read_text()
    assert "## Prompts found (val split, " in opt_text

    final = json.loads((res / "final" / "final.json").read_text())
    test_prompts = json.loads((res / "final" / "test" / "prompts_test.json").read_text())["targets"]
    assert len(test_prompts) == 8 and all(t["image_id"].startswith("test-") for t in test_prompts)
    ratio = sum(t["ratio"] for t in test_prompts) / len(test_prompts)
    assert final["test"]["test/caption_ratio"] == pytest.approx(ratio)
    final_text = (reports / "final_report.md").read_text()
    assert "## Prompts found (test split, final config)" in final_text
    assert all(f"`{t['prompt']}`" in final_text for t in test_prompts)
    assert (reports / "plots" / "final_prompts.png").is_file()
