"""The latent trainer's data: prepare (user file and embedded matminer table), splits, scaling."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tunewise.trainers.latent import data as latent_data
from tunewise.trainers.latent.data import DEFAULT_DATA, featurize, load_splits, magpie_labels, prepare

FIXTURE = Path(__file__).parent / "data" / "latent" / "transport_small.csv"
TARGETS = ["PF_p", "S_p", "sigma_p", "kappa_p"]


def user_cfg(**over) -> dict:
    cfg = {**DEFAULT_DATA, "source": "path", "path": str(FIXTURE), "split": {"val": 0.2, "test": 0.2, "seed": 0}}
    cfg.update(over)
    return cfg


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, dict]:
    cfg = user_cfg()
    prepare(cfg, tmp_path)
    return tmp_path, cfg


# --- prepare: a user's file ---------------------------------------------------------------------


def test_prepare_user_csv_writes_table_and_meta(tmp_path):
    meta = prepare(user_cfg(), tmp_path)
    table = pd.read_parquet(tmp_path / "table.parquet")
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta
    assert set(meta) == {
        "source", "path", "n_rows", "n_dropped", "descriptor_columns", "target_columns", "target_stats", "data_checks",
        "seconds", "fingerprint",
    }
    checks = meta["data_checks"]
    assert checks["rows"] == {"read": 60, "kept": 60, "train": 36, "val": 12, "test": 12}
    assert checks["dropped"] == []
    # the fixture's one kappa_p <= 0 has no log10: training treats it as missing, and the checks say so
    (warning,) = checks["warnings"]
    assert "column 'kappa_p': 1 of 60 values are <= 0" in warning and "data.log_targets" in warning
    assert any("'notes'" in n and "text" in n for n in checks["notes"])  # the text column, said to be left out
    assert any("'sigma_p': 1 of 60 rows have no value" in n for n in checks["notes"])
    assert meta["source"] == "path" and meta["path"] == str(FIXTURE)
    assert meta["n_rows"] == 60 and meta["n_dropped"] == 0
    # numeric non-target columns only: the text column and id/formula are not descriptors
    assert meta["descriptor_columns"] == [f"desc_{j}" for j in range(5)]
    assert meta["target_columns"] == TARGETS
    assert list(table.columns) == ["id", "formula", *meta["descriptor_columns"], *TARGETS]
    raw = pd.read_csv(FIXTURE)
    assert table["id"].tolist() == raw["mp_id"].tolist()
    assert table["formula"].tolist()[:4] == ["Fe2O3", "NaCl", "SiO2", "Bi2Te3"]
    # targets stay raw (physical units, NaN kept) in the table: transforms belong to load_splits
    np.testing.assert_array_equal(table["sigma_p"].to_numpy(), raw["sigma_p"].to_numpy())
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_is_cached_by_fingerprint(tmp_path):
    first = prepare(user_cfg(), tmp_path)
    mtime = (tmp_path / "table.parquet").stat().st_mtime_ns
    time.sleep(0.01)
    # noise, split and log_targets do not shape the table: no rework for them either
    again = prepare(user_cfg(noise=0.3, split={"val": 0.1, "test": 0.1, "seed": 5}, log_targets=[]), tmp_path)
    # same `seconds`: the stored meta came back, nothing was rebuilt; only the split counts follow the new split
    split_counts = {"train": 48, "val": 6, "test": 6}
    assert again["data_checks"]["rows"] == {**first["data_checks"]["rows"], **split_counts}
    assert {k: v for k, v in again.items() if k != "data_checks"} == {k: v for k, v in first.items() if k != "data_checks"}
    assert {k: v for k, v in again["data_checks"].items() if k != "rows"} == \
        {k: v for k, v in first["data_checks"].items() if k != "rows"}
    assert (tmp_path / "table.parquet").stat().st_mtime_ns == mtime
    changed = prepare(user_cfg(targets=["S_p", "PF_p"]), tmp_path)
    assert changed["fingerprint"] != first["fingerprint"]
    assert changed["target_columns"] == ["S_p", "PF_p"]
    assert (tmp_path / "table.parquet").stat().st_mtime_ns != mtime


def test_prepare_rebuilds_when_the_user_file_changes(tmp_path):
    src = tmp_path / "mine.csv"
    pd.read_csv(FIXTURE).to_csv(src, index=False)
    out = tmp_path / "prepared"
    assert prepare(user_cfg(path=str(src)), out)["n_rows"] == 60
    pd.read_csv(FIXTURE).head(30).to_csv(src, index=False)
    assert prepare(user_cfg(path=str(src)), out)["n_rows"] == 30


def test_prepare_missing_file_names_the_key_and_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError) as e:
        prepare(user_cfg(path=str(missing)), tmp_path / "out")
    assert "data.path" in str(e.value) and str(missing) in str(e.value)


def test_prepare_missing_target_column_names_column_and_file(tmp_path):
    with pytest.raises(ValueError) as e:
        prepare(user_cfg(targets=["PF_p", "zT_p"]), tmp_path)
    msg = str(e.value)
    assert "data.targets" in msg and "zT_p" in msg and str(FIXTURE) in msg and "PF_p" not in msg.split("(")[0]


def test_prepare_missing_descriptor_column_names_column_and_file(tmp_path):
    with pytest.raises(ValueError) as e:
        prepare(user_cfg(descriptor_columns=["desc_0", "band_gap"]), tmp_path)
    assert "data.descriptor_columns" in str(e.value) and "band_gap" in str(e.value) and str(FIXTURE) in str(e.value)


def test_prepare_explicit_descriptor_columns_and_parquet_input(tmp_path):
    src = tmp_path / "mine.parquet"
    pd.read_csv(FIXTURE).to_parquet(src)
    meta = prepare(user_cfg(path=str(src), descriptor_columns=["desc_3", "desc_1"]), tmp_path / "out")
    assert meta["descriptor_columns"] == ["desc_3", "desc_1"]
    with pytest.raises(ValueError, match="not numeric"):
        prepare(user_cfg(descriptor_columns=["notes"]), tmp_path / "out2")


def test_prepare_counts_rows_with_missing_descriptors(tmp_path):
    raw = pd.read_csv(FIXTURE)
    raw.loc[[3, 9], "desc_2"] = np.nan
    src = tmp_path / "holes.csv"
    raw.to_csv(src, index=False)
    meta = prepare(user_cfg(path=str(src)), tmp_path / "out")
    assert meta["n_dropped"] == 2 and meta["n_rows"] == 58
    table = pd.read_parquet(tmp_path / "out" / "table.parquet")
    assert "mp-1003" not in set(table["id"]) and "mp-1009" not in set(table["id"])


def test_prepare_limit_takes_a_seeded_shuffled_subset(tmp_path):
    # 5 rows each for val and test: the fewest the data checks allow
    split = {"val": 0.25, "test": 0.25, "seed": 0}
    a = prepare(user_cfg(limit=20, split=split), tmp_path / "a")
    prepare(user_cfg(limit=20, split=split), tmp_path / "b")
    ids_a = pd.read_parquet(tmp_path / "a" / "table.parquet")["id"].tolist()
    ids_b = pd.read_parquet(tmp_path / "b" / "table.parquet")["id"].tolist()
    assert a["n_rows"] == 20 and ids_a == ids_b
    assert ids_a != pd.read_csv(FIXTURE)["mp_id"].head(20).tolist()  # not simply the head


# --- prepare: the embedded matminer table -------------------------------------------------------------


def test_read_embedded_table_is_the_transport_database():
    table = latent_data.read_embedded_table()
    assert len(table) == 47_737
    assert list(table.columns) == [
        "mp_id", "pretty_formula", "sigma_p", "sigma_n", "S_p", "S_n",
        "kappa_p", "kappa_n", "PF_p", "PF_n", "m_p", "m_n",
    ]


def test_prepare_embedded_limit_featurises_with_magpie(tmp_path):
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition

    meta = prepare({**DEFAULT_DATA, "limit": 40, "split": {"val": 0.2, "test": 0.2}}, tmp_path, threads=1)
    assert meta["source"] == "embedded"
    assert meta["n_rows"] + meta["n_dropped"] == 40
    assert meta["n_rows"] >= 38
    labels = ElementProperty.from_preset("magpie", impute_nan=True).feature_labels()
    assert meta["descriptor_columns"] == labels and len(labels) == 132
    table = pd.read_parquet(tmp_path / "table.parquet")
    row = table.iloc[0]
    expected = ElementProperty.from_preset("magpie", impute_nan=True).featurize(Composition(row["formula"]))
    np.testing.assert_allclose(row[labels].to_numpy(dtype=float), expected)
    # raw targets are the table's own values for that compound
    embedded = latent_data.read_embedded_table().set_index("mp_id")
    np.testing.assert_allclose(row[TARGETS].to_numpy(dtype=float), embedded.loc[row["id"], TARGETS].to_numpy(dtype=float))
    assert table["id"].is_unique


def test_unfeaturisable_formulas_are_counted_and_dropped(tmp_path, monkeypatch, caplog):
    good = ["Fe2O3", "NaCl", "SiO2", "Bi2Te3", "PbTe", "Mg2Si", "GaAs", "ZnO", "TiO2", "CuO"] * 5
    formulas = [*good[:20], "NotAFormula123", *good[20:], "Xx2"]
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({
        "mp_id": [f"mp-{i}" for i in range(len(formulas))],
        "pretty_formula": formulas,
        **{c: rng.uniform(1, 10, len(formulas)) for c in ["sigma_p", "sigma_n", "S_p", "S_n", "kappa_p", "kappa_n",
                                                          "PF_p", "PF_n", "m_p", "m_n"]},
    })
    monkeypatch.setattr(latent_data, "read_embedded_table", lambda: rows)
    with caplog.at_level("WARNING"):
        meta = prepare(dict(DEFAULT_DATA), tmp_path)
    assert meta["n_dropped"] == 2 and meta["n_rows"] == 50
    assert "2 rows dropped (unparsable formula" in caplog.text
    (dropped,) = meta["data_checks"]["dropped"]
    assert dropped["count"] == 2 and dropped["reason"] == "unparsable formula"
    assert dropped["examples"] == ["NotAFormula123", "Xx2"] and "column pretty_formula" in dropped["where"]
    table = pd.read_parquet(tmp_path / "table.parquet")
    assert "mp-20" not in table["id"].tolist() and "mp-51" not in table["id"].tolist()  # dropped, never zero-filled
    assert np.isfinite(table[meta["descriptor_columns"]].to_numpy()).all()


def test_featurize_equals_matminers_own_featurizer():
    """The vectorised featurisation gives matminer's numbers, bit for bit, and drops what matminer cannot do."""
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition

    embedded = latent_data.read_embedded_table()["pretty_formula"].astype(str).tolist()
    sample = [embedded[i] for i in np.random.default_rng(0).choice(len(embedded), 300, replace=False)]
    formulas = ["Fe2O3", "bad(", "Bi2Te3", "SiO2", "PbTe", "Xx2", "GaAs", "H2O", "O2", *sample]
    features, ok = featurize(formulas)
    assert ok[:7].tolist() == [True, False, True, True, True, False, True]
    assert features.shape == (len(formulas), len(magpie_labels())) and np.isnan(features[~ok]).all()
    reference = ElementProperty.from_preset("magpie", impute_nan=True)
    for formula, row, good in zip(formulas, features, ok):
        if good:
            np.testing.assert_array_equal(row, np.array(reference.featurize(Composition(formula)), dtype=float), formula)


# --- splits and scaling -------------------------------------------------------------------------


def test_splits_are_disjoint_cover_all_rows_and_follow_split_seed(prepared):
    out, cfg = prepared
    splits = load_splits(out, cfg)
    ids = {s: splits.ids[s] for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [36, 12, 12]
    union = set(ids["train"]) | set(ids["val"]) | set(ids["test"])
    assert len(union) == 60 and union == set(pd.read_csv(FIXTURE)["mp_id"])
    for s in ("train", "val", "test"):
        assert splits.x[s].shape == (len(ids[s]), 5) and splits.y[s].shape == (len(ids[s]), 4)
        assert splits.x[s].dtype == splits.y[s].dtype == torch.float32
    again = load_splits(out, cfg)
    assert again.ids == splits.ids
    # the training seed is not in the data config: only split.seed moves the partition
    other = load_splits(out, {**cfg, "split": {**cfg["split"], "seed": 1}})
    assert set(other.ids["test"]) != set(ids["test"])
    # formulas travel with their rows
    raw = pd.read_csv(FIXTURE).set_index("mp_id")
    assert splits.formulas["val"] == [raw.loc[i, "pretty_formula"] for i in ids["val"]]


def test_scaler_is_fitted_on_train_only(prepared):
    out, cfg = prepared
    splits = load_splits(out, cfg)
    x_train = splits.x["train"].double()
    np.testing.assert_allclose(x_train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    y_train = splits.y["train"].double().numpy()
    np.testing.assert_allclose(np.nanmean(y_train, axis=0), 0.0, atol=1e-5)
    # the same statistics applied to val: its mean is not forced to 0
    assert np.abs(splits.x["val"].double().mean(0).numpy()).max() > 0.05
    # and they are the train rows' statistics, not the whole table's
    table = pd.read_parquet(out / "table.parquet").set_index("id")
    train_desc = table.loc[splits.ids["train"], splits.descriptor_columns].to_numpy()
    np.testing.assert_allclose(splits.scaler.x_mean, train_desc.mean(0))
    assert not np.allclose(splits.scaler.x_mean, table[splits.descriptor_columns].to_numpy().mean(0))


def test_inverse_y_round_trips_to_physical_units(prepared):
    out, cfg = prepared
    splits = load_splits(out, cfg)
    assert splits.scaler.log_targets == ["PF_p", "sigma_p", "kappa_p"]  # S_p is not in log_targets
    raw = pd.read_csv(FIXTURE).set_index("mp_id")
    for s in ("train", "val", "test"):
        expected = raw.loc[splits.ids[s], TARGETS].to_numpy(dtype=float)
        logged = [TARGETS.index(t) for t in ("PF_p", "sigma_p", "kappa_p")]
        expected[:, logged] = np.where(expected[:, logged] <= 0, np.nan, expected[:, logged])  # no log of 0
        back = splits.scaler.inverse_y(splits.y[s].double().numpy())
        np.testing.assert_allclose(back, expected, rtol=1e-5)
        back_t = splits.scaler.inverse_y(splits.y[s].double())  # tensors come back as tensors
        np.testing.assert_allclose(back_t.numpy(), expected, rtol=1e-5)
    # the missing sigma_p and the zero kappa_p are NaN, and the zero is counted
    assert splits.n_nonpositive == {"kappa_p": 1}
    all_y = {i: row for s in ("train", "val", "test") for i, row in zip(splits.ids[s], splits.y[s].numpy())}
    assert math.isnan(all_y["mp-1007"][TARGETS.index("sigma_p")])
    assert math.isnan(all_y["mp-1011"][TARGETS.index("kappa_p")])
    # standardised log space: a predicted 0 is the train geometric mean, i.e. 10**mean(log10)
    zero = splits.scaler.inverse_y(np.zeros((1, 4)))[0]
    assert zero[TARGETS.index("S_p")] == pytest.approx(splits.scaler.y_mean[TARGETS.index("S_p")])
    assert zero[TARGETS.index("PF_p")] == pytest.approx(10 ** splits.scaler.y_mean[TARGETS.index("PF_p")])
    # transform_y is inverse_y's inverse
    phys = raw.loc[splits.ids["train"][:5], TARGETS].to_numpy(dtype=float)
    np.testing.assert_allclose(splits.scaler.inverse_y(splits.scaler.transform_y(phys)), phys, rtol=1e-9)


def test_scaler_serialises(prepared):
    out, cfg = prepared
    scaler = load_splits(out, cfg).scaler
    copy = latent_data.Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    y = np.random.default_rng(0).normal(size=(3, 4))
    np.testing.assert_allclose(copy.inverse_y(y), scaler.inverse_y(y))


def test_load_splits_refuses_a_table_prepared_for_other_targets(prepared):
    out, cfg = prepared
    with pytest.raises(ValueError, match="data.targets"):
        load_splits(out, {**cfg, "targets": ["S_p"]})
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_splits(out / "elsewhere", cfg)


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="data.split"):
        latent_data.split_indices(10, {"val": 0.6, "test": 0.5, "seed": 0})
    sizes = {k: len(v) for k, v in latent_data.split_indices(7, {"val": 0.1, "test": 0.1, "seed": 0}).items()}
    assert sizes == {"test": 1, "val": 1, "train": 5}  # a non-zero share keeps one row on tiny tables
