"""The latent trainer's data checks at prepare (issue 15): a formula table gets the embedded data's Magpie
descriptors, bad data are refused before any file is written, and what was dropped or looks doubtful is
returned as `data_checks` (ready.json), the same for a cached preparation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from latent_tables import UNPARSABLE, compounds_table
from tunewise.trainers.latent.data import DEFAULT_DATA, featurize, magpie_labels, min_rows, prepare

REPO = Path(__file__).resolve().parents[1]
FORMULA_TARGETS = ["band_gap", "bulk_modulus"]


def cfg_for(path: Path, **over) -> dict:
    return {**DEFAULT_DATA, "source": "path", "path": str(path), "targets": FORMULA_TARGETS,
            "log_targets": ["bulk_modulus"], "split": {"val": 0.15, "test": 0.15, "seed": 0}, **over}


@pytest.fixture
def formula_csv(tmp_path) -> Path:
    path = tmp_path / "compounds.csv"
    compounds_table(n=80).to_csv(path, index=False)
    return path


def descriptor_table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    return pd.DataFrame({"name": [f"c{i}" for i in range(n)], "d1": x[:, 0], "d2": x[:, 1], "d3": x[:, 2],
                         "band_gap": x @ [1.0, 0.5, 0.0] + rng.normal(0, 0.3, n),
                         "bulk_modulus": 10 ** (2 + 0.2 * x[:, 2] + rng.normal(0, 0.1, n))})


# --- a formula table ----------------------------------------------------------------------------------------


def test_a_formula_table_gets_the_embedded_datas_magpie_descriptors(formula_csv, tmp_path):
    meta = prepare(cfg_for(formula_csv), tmp_path / "prep")
    assert meta["descriptor_columns"] == magpie_labels() and len(meta["descriptor_columns"]) == 132
    table = pd.read_parquet(tmp_path / "prep" / "table.parquet")
    raw = pd.read_csv(formula_csv)
    good = raw[~raw["formula"].isin(UNPARSABLE)]
    assert table["formula"].tolist() == good["formula"].tolist()  # the formula names the row
    expected, ok = featurize(good["formula"].tolist())
    assert ok.all()
    np.testing.assert_allclose(table[magpie_labels()].to_numpy(), expected)
    checks = meta["data_checks"]
    assert checks["rows"] == {"read": 83, "kept": 80, "train": 56, "val": 12, "test": 12}
    assert checks["dropped"] == [{"count": 3, "reason": "unparsable formula", "where": f"{formula_csv} column formula",
                                  "examples": UNPARSABLE}]
    assert checks["warnings"] == []
    assert f"featurised 80 formulas ({formula_csv} column formula) with Magpie (132 descriptors)" in checks["notes"]


def test_the_configured_formula_column_wins_over_one_named_formula(tmp_path):
    table = compounds_table(n=60).rename(columns={"formula": "composition"})
    table["formula"] = "not used"  # a text column of another meaning
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    meta = prepare(cfg_for(path, formula_column="composition"), tmp_path / "prep")
    assert meta["n_rows"] == 60 and meta["descriptor_columns"] == magpie_labels()


def test_descriptor_columns_win_over_a_formula_column_and_magpie_asks_for_the_formulas(tmp_path):
    table = descriptor_table()
    table.insert(0, "formula", compounds_table(n=60, unparsable=[])["formula"])
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    given = prepare(cfg_for(path), tmp_path / "a")
    assert given["descriptor_columns"] == ["d1", "d2", "d3"]
    assert pd.read_parquet(tmp_path / "a" / "table.parquet")["formula"].tolist() == table["formula"].tolist()
    magpie = prepare(cfg_for(path, descriptor_columns="magpie"), tmp_path / "b")
    assert magpie["descriptor_columns"] == magpie_labels()


def test_a_cached_preparation_returns_the_same_data_checks(formula_csv, tmp_path, monkeypatch):
    from tunewise.trainers.latent import data as latent_data

    first = prepare(cfg_for(formula_csv), tmp_path / "prep")
    monkeypatch.setattr(latent_data, "featurize", None)  # a rebuild would fail: the cache must answer
    monkeypatch.setattr(latent_data, "_featurize_compositions", None)
    again = prepare(cfg_for(formula_csv), tmp_path / "prep")
    assert again == first and again["data_checks"]["dropped"][0]["count"] == 3
    on_disk = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert on_disk["data_checks"] == first["data_checks"]


# --- dropped and warned -------------------------------------------------------------------------------------


def test_duplicate_descriptor_columns_keep_one_with_a_warning(tmp_path):
    table = descriptor_table()
    table["d2_again"] = table["d2"]
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    meta = prepare(cfg_for(path), tmp_path / "prep")
    assert meta["descriptor_columns"] == ["d1", "d2", "d3"]
    (warning,) = meta["data_checks"]["warnings"]
    assert f"{path} column 'd2_again' is identical to column 'd2'" in warning


def test_infinite_and_missing_descriptors_drop_their_rows_with_counts(tmp_path):
    table = descriptor_table()
    table.loc[[4, 9], "d1"] = np.inf
    table.loc[12, "d3"] = -np.inf
    table.loc[20, "d2"] = np.nan
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    meta = prepare(cfg_for(path), tmp_path / "prep")
    assert meta["n_rows"] == 56 and meta["n_dropped"] == 4
    dropped = {d["reason"]: d for d in meta["data_checks"]["dropped"]}
    assert dropped["infinite descriptor value"]["count"] == 3
    assert dropped["infinite descriptor value"]["examples"] == ["row 4", "row 9", "row 12"]
    assert "['d1', 'd3']" in dropped["infinite descriptor value"]["where"]
    assert dropped["missing descriptor value"]["count"] == 1
    assert np.isfinite(pd.read_parquet(tmp_path / "prep" / "table.parquet")[["d1", "d2", "d3"]].to_numpy()).all()


def test_a_mostly_numeric_text_column_is_warned(tmp_path):
    table = descriptor_table()
    table["d4"] = table["d1"].round(2).astype(str)
    table.loc[3, "d4"] = "1.2 eV"
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    meta = prepare(cfg_for(path), tmp_path / "prep")
    assert "d4" not in meta["descriptor_columns"]
    (warning,) = meta["data_checks"]["warnings"]
    assert "column 'd4' is mostly numbers but has text cells (e.g. ['1.2 eV'])" in warning


def test_missing_target_values_and_nonpositive_log_targets_are_counted(tmp_path):
    table = descriptor_table()
    table.loc[[1, 2], "band_gap"] = np.nan
    table.loc[5, "bulk_modulus"] = -3.0
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    checks = prepare(cfg_for(path), tmp_path / "prep")["data_checks"]
    assert "target 'band_gap': 2 of 60 rows have no value (the loss skips them)" in checks["notes"]
    (warning,) = checks["warnings"]
    assert "column 'bulk_modulus': 1 of 60 values are <= 0" in warning


# --- refused ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("val, test, least", [(0.1, 0.1, 46), (0.2, 0.2, 23), (0.0, 0.2, 23), (0.0, 0.0, 10)])
def test_min_rows_gives_each_split_its_minimum(val, test, least):
    assert min_rows(val, test) == least


def test_a_leaking_column_is_refused_and_nothing_is_written(tmp_path):
    table = descriptor_table()
    table["gap_copy"] = table["band_gap"] * 2.0 + 1.0  # a rescaled copy is the same leak
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="descriptor column 'gap_copy' .* is target 'band_gap' again"):
        prepare(cfg_for(path), tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


def test_a_leaking_column_stops_the_workflow_before_any_training(tmp_path, capsys):
    """The data phase as the workflow runs it (`tunewise prepare-data`, then the baseline would train): exit code
    2 naming both columns, no ready.json, so no training job can start, and no run directory exists."""
    from tunewise.cli import main

    table = descriptor_table()
    table["leak"] = table["bulk_modulus"]
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    config = {"experiments": {"mine": {"trainer": "latent", "data": {
        "source": "path", "path": str(path), "targets": FORMULA_TARGETS, "log_targets": ["bulk_modulus"]},
        "design": {"objectives": [{"task": "band_gap", "mode": "max"}]}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    exp_file = tmp_path / "results" / "mine" / "experiment.yaml"
    assert main(["resolve", "--config", str(tmp_path / "config.yaml"), "--experiment", "mine", "--out", str(exp_file)]) == 0
    ready = exp_file.parent / "data" / "ready.json"
    capsys.readouterr()
    assert main(["prepare-data", "--experiment-file", str(exp_file), "--out", str(ready)]) == 2
    err = capsys.readouterr().err
    assert "descriptor column 'leak'" in err and "target 'bulk_modulus'" in err and "Traceback" not in err
    assert not ready.exists()
    assert not (exp_file.parent / "baseline").exists()


def test_an_infinite_target_is_refused_so_no_run_can_diverge_on_it(tmp_path):
    table = descriptor_table()
    table.loc[7, "band_gap"] = -np.inf
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'band_gap' of .* has 1 infinite value\(s\) \(rows with id \['7'\]\)"):
        prepare(cfg_for(path), tmp_path / "prep")


def test_a_descriptor_too_large_to_standardise_is_refused(tmp_path):
    table = descriptor_table()
    table["d3"] = table["d3"] * 1e200
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="descriptor column 'd3' .* too large to standardise"):
        prepare(cfg_for(path), tmp_path / "prep")


def test_a_target_too_large_to_standardise_is_refused_unless_it_is_trained_as_log10(tmp_path):
    table = descriptor_table()
    table["bulk_modulus"] = table["bulk_modulus"] * 1e200
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="column 'bulk_modulus' .* too large to standardise; .* data.log_targets"):
        prepare(cfg_for(path, log_targets=[]), tmp_path / "prep")
    assert prepare(cfg_for(path), tmp_path / "prep")["n_rows"] == 60  # log10 of 1e202 is 202


def test_leakage_is_found_at_any_scale():
    from tunewise.trainers.latent.data import _correlations

    rng = np.random.default_rng(0)
    y = rng.normal(size=50) * 1e200
    x = np.stack([y * 3.0, rng.normal(size=50), np.zeros(50)], axis=1)
    r = _correlations(x, y)
    assert r[0] == pytest.approx(1.0) and abs(r[1]) < 0.5 and np.isnan(r[2])


@pytest.mark.parametrize("sep, decimal", [(";", ","), (";", "."), ("\t", ".")])
def test_a_spreadsheet_export_with_another_separator_reads_as_the_comma_csv(tmp_path, sep, decimal):
    table = descriptor_table()
    comma = tmp_path / "comma.csv"
    table.to_csv(comma, index=False)
    other = tmp_path / "other.csv"  # what Excel writes in a locale whose list separator is ';'
    table.to_csv(other, index=False, sep=sep, decimal=decimal)
    a = prepare(cfg_for(comma, id_column="name"), tmp_path / "a")
    b = prepare(cfg_for(other, id_column="name"), tmp_path / "b")
    assert b["descriptor_columns"] == a["descriptor_columns"] == ["d1", "d2", "d3"]
    assert b["data_checks"]["rows"] == a["data_checks"]["rows"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "table.parquet"),
                                  pd.read_parquet(tmp_path / "a" / "table.parquet"))


def test_the_default_design_objective_on_a_table_without_it_says_what_to_set():
    from tunewise.trainers.latent.design_settings import check_design_config, resolve_design_config

    with pytest.raises(ValueError, match=r"'PF_p' is not a target column \(band_gap, bulk_modulus\) \(it is the "
                                         r"default objective: set design.objectives, e.g. \[\{task: band_gap"):
        check_design_config(resolve_design_config(None), FORMULA_TARGETS)


def test_a_formula_given_twice_is_warned_about_since_its_copies_straddle_the_split(tmp_path):
    table = pd.DataFrame({"formula": ["Si", "Ge", "GaAs", "Si", "PbTe", "Si", "GaAs"] + [f"Mg{i}Si" for i in range(1, 60)],
                          "band_gap": np.linspace(0.1, 3.0, 66), "bulk_modulus": np.linspace(20.0, 200.0, 66)})
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    warnings = prepare(cfg_for(path), tmp_path / "prep")["data_checks"]["warnings"]
    (repeated,) = [w for w in warnings if "occur more than once" in w]
    assert "2 formulas occur more than once (Si x3, GaAs x2)" in repeated and "optimistic" in repeated
