"""The README's textcaps configs for a user's own TextCaps, as written, through the whole workflow (issue 15): one
Snakemake run with two experiments, one on a tiny folder in the original JSON + images + OCR layout (with one
caption whose image file is missing), one on a tiny folder in the Hugging Face parquet layout (no OCR files).
Both must reach their final report with no config edit, and the data checks must say what was dropped and that
the parquet copy has no OCR."""
from __future__ import annotations

import json

import pytest
import yaml

from e2e_support import readme_config, snakemake, write_config
from textcaps_user_data import MISSING_IMAGE, TINY, write_json_layout, write_parquet_layout

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    work = tmp_path_factory.mktemp("textcaps_user")
    cache = tmp_path_factory.mktemp("textcaps_generated")
    configs = [readme_config("textcaps-json", write_json_layout(work / "textcaps_json", cache)),
               readme_config("textcaps-parquet", write_parquet_layout(work / "textcaps_parquet", cache))]
    experiments = {name: exp for c in configs for name, exp in c["experiments"].items()}
    assert len(experiments) == 2, "the two README configs need different experiment names"
    write_config(work / "config.yaml", experiments)
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1", configfile=work / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    json_name, parquet_name = (next(iter(c["experiments"])) for c in configs)
    return work, json_name, parquet_name


def _ready(work, name) -> dict:
    return json.loads((work / "results" / name / "data" / "ready.json").read_text())


def test_both_layouts_reach_the_final_report_in_expand_mode(workflow):
    work, *names = workflow
    for name in names:
        assert (work / "reports" / name / "final_report.md").stat().st_size > 0
        exp = yaml.safe_load((work / "results" / name / "experiment.yaml").read_text())
        # the mode the data called for, and the settings that follow it, with no second validation round
        assert exp["baseline"]["data"]["mode"] == "expand"
        assert exp["baseline"]["model"]["shared_encoder"] is None
        assert [g["name"] for g in exp["baseline"]["data"]["groups"]] == ["image", "text", "both"]


def test_the_json_layout_counts_the_caption_whose_image_is_missing(workflow):
    work, json_name, _ = workflow
    ready = _ready(work, json_name)
    checks = ready["data_checks"]
    assert checks["rows"] == {"train": TINY["n_train"], "val": TINY["n_val"], "test": TINY["n_test"]}
    assert [(d["count"], d["reason"], d["examples"]) for d in checks["dropped"]] == \
           [(1, "image file missing", [MISSING_IMAGE])]
    assert checks["dropped"][0]["where"].endswith("TextCaps_0.1_train.json")
    assert not any("OCR" in w for w in checks["warnings"]), checks["warnings"]  # the OCR files are there
    assert ready["format"] == {"train": "json", "val": "json", "test": "json"}


def test_the_parquet_layout_says_the_text_view_has_no_ocr_and_how_to_fix_it(workflow):
    work, _, parquet_name = workflow
    ready = _ready(work, parquet_name)
    checks = ready["data_checks"]
    assert ready["format"] == {"train": "parquet", "val": "parquet", "test": "parquet"}
    assert checks["rows"] == {"train": TINY["n_train"], "val": TINY["n_val"], "test": TINY["n_test"]}
    assert checks["dropped"] == []
    (ocr,) = [w for w in checks["warnings"] if "no OCR records" in w]
    assert "data.ocr_dir" in ocr and "text view" in ocr and "parquet" in ocr


def test_the_diagnostic_report_states_the_missing_ocr_and_the_dropped_caption(workflow):
    work, json_name, parquet_name = workflow
    parquet_report = (work / "reports" / parquet_name / "diagnostic_report.md").read_text()
    data = parquet_report.split("## Data\n", 1)[1].split("\n## ", 1)[0]
    (ocr,) = [w for w in _ready(work, parquet_name)["data_checks"]["warnings"] if "no OCR records" in w]
    assert f"- {ocr}" in data and "data.ocr_dir" in data
    json_report = (work / "reports" / json_name / "diagnostic_report.md").read_text()
    data = json_report.split("## Data\n", 1)[1].split("\n## ", 1)[0]
    assert f"| 1 | image file missing |" in data and MISSING_IMAGE in data
    # the warning is a finding of the data, not of the training
    diagnosis = json.loads((work / "results" / parquet_name / "diagnosis" / "diagnosis.json").read_text())
    assert any(f["root_cause"] == "data" for f in diagnosis["findings"])
