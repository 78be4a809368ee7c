"""A user's TextCaps (issue 15): the mode chosen from the data source, and prepare_data's checks and data_checks
summary on small folders in both layouts (what is refused is in tests/data/bad/cases_textcaps.yaml)."""
from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from e2e_support import env
from textcaps_user_data import MISSING_IMAGE, TINY, write_json_layout, write_parquet_layout
from tunewise.experiment import resolve_experiment, validate
from tunewise.trainers.textcaps.data import annotation_name, generate, ocr_name
from tunewise.trainers.textcaps.spec import TextCapsSpec, resolve_mode
from tunewise.trainers.textcaps.trainer import TextCapsTrainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("generated")


@pytest.fixture
def json_root(tmp_path, cache):
    return write_json_layout(tmp_path / "json", cache)


def _data(root, **extra) -> dict:
    data = TextCapsSpec().default_config()["data"]
    data.update({"source": "path", "path": str(root), "mode": "expand", **extra})
    return data


def _prepare(root, out, **extra) -> dict:
    return TextCapsTrainer().prepare_data(_data(root, **extra), out, threads=1)


# --- the mode follows the data source -------------------------------------------------------------------------


def test_mode_auto_is_spurious_on_generated_data_and_expand_on_a_users_textcaps(json_root):
    config = validate({"experiments": {
        "gen": {"trainer": "textcaps"},
        "mine": {"trainer": "textcaps", "data": {"source": "path", "path": str(json_root)}},
    }})
    gen, mine = (resolve_experiment(config, name)["baseline"] for name in ("gen", "mine"))
    assert (gen["data"]["mode"], gen["model"]["shared_encoder"]) == ("spurious", "combined")
    assert [g["name"] for g in gen["data"]["groups"]] == ["majority", "minority"]
    assert (mine["data"]["mode"], mine["model"]["shared_encoder"]) == ("expand", None)
    assert [(g["name"], g["modality"]) for g in mine["data"]["groups"]] == [
        ("image", "visual"), ("text", "text"), ("both", "combined")]
    again = copy.deepcopy(mine)
    assert resolve_mode(again) == mine  # idempotent: a run's config.yaml resolves to itself


def test_explicit_settings_win_over_auto(json_root):
    config = TextCapsSpec().default_config()
    config["data"].update(source="path", path=str(json_root), mode="spurious")
    resolve_mode(config)
    assert config["data"]["groups"] == [{"name": "majority"}, {"name": "minority"}]
    assert config["model"]["shared_encoder"] == "combined"
    config = TextCapsSpec().default_config()
    config["data"].update(groups=[{"name": "pixels", "modality": "visual"}], mode="expand")
    TextCapsSpec().check_config(config)
    assert config["data"]["groups"] == [{"name": "pixels", "modality": "visual"}]
    assert config["model"]["shared_encoder"] is None


def test_validating_a_path_config_imports_no_torch(json_root):
    code = ("import sys; from tunewise.experiment import validate; "
            f"validate({{'experiments': {{'t': {{'trainer': 'textcaps', 'data': {{'source': 'path', "
            f"'path': {str(json_root)!r}}}}}}}}}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# --- prepare_data's summary ------------------------------------------------------------------------------------


def test_embedded_preparation_carries_an_empty_data_checks_summary(tmp_path):
    trainer = TextCapsTrainer()
    data = trainer.default_config()["data"]
    data["generator"].update(n_train=20, n_val=10, n_test=10, image_size=32)
    checks = trainer.prepare_data(data, tmp_path, threads=1)["data_checks"]
    assert checks["rows"] == {"train": 20, "val": 10, "test": 10}
    assert checks["dropped"] == [] and checks["warnings"] == [] and isinstance(checks["notes"], list)


def test_json_layout_summary_and_its_cache(json_root, tmp_path):
    out = tmp_path / "prepared"
    first = _prepare(json_root, out)
    checks = first["data_checks"]
    assert set(checks) == {"rows", "dropped", "warnings", "notes"}
    assert checks["rows"] == {"train": TINY["n_train"], "val": TINY["n_val"], "test": TINY["n_test"]}
    assert checks["dropped"] == [{"count": 1, "reason": "image file missing",
                                  "where": str(json_root / annotation_name("train")), "examples": [MISSING_IMAGE]}]
    assert first["n_rows"] == sum(checks["rows"].values()) and len(first["classes"]) == 10
    # cached: the same answer without reading the images again
    (json_root / "train").rename(json_root / "moved")
    assert _prepare(json_root, out) == first
    # a changed annotation file is checked again
    time.sleep(0.01)
    doc = json.loads((json_root / annotation_name("train")).read_text())
    (json_root / annotation_name("train")).write_text(json.dumps(doc) + "\n")
    with pytest.raises(ValueError, match="none of the 31 images of split 'train' could be read"):
        _prepare(json_root, out)


def test_unreadable_and_degenerate_images_are_dropped_and_named(json_root, tmp_path):
    images = sorted((json_root / "train").glob("*.png"))
    images[0].write_text("<html>not an image</html>")
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    images[1].write_bytes(buf.getvalue())
    checks = _prepare(json_root, tmp_path / "prepared")["data_checks"]
    reasons = {d["reason"]: d for d in checks["dropped"]}
    assert reasons["not a readable image (e.g. a text file named .jpg)"]["examples"] == [f"train/{images[0].name}"]
    degenerate = reasons["image smaller than 8x8 px (e.g. a 1x1 placeholder)"]
    assert degenerate["count"] == 1 and degenerate["examples"] == [f"train/{images[1].name} (1x1 px)"]
    assert checks["rows"]["train"] == TINY["n_train"] - 2
    assert any("3 unusable images or entries dropped" in w for w in checks["warnings"])


def test_ocr_records_of_unknown_images_and_images_without_ocr_are_warned_about(json_root, tmp_path):
    path = json_root / ocr_name("val")
    doc = json.loads(path.read_text())
    doc["data"] = doc["data"][2:] + [{"image_id": f"stranger{i}", "ocr_tokens": ["x"]} for i in range(3)]
    path.write_text(json.dumps(doc))
    warnings = _prepare(json_root, tmp_path / "prepared")["data_checks"]["warnings"]
    unmatched = [w for w in warnings if "match no image" in w]
    assert len(unmatched) == 1 and f"3 of {TINY['n_val'] + 1} OCR records" in unmatched[0]
    assert "stranger0" in unmatched[0] and "data.ocr_dir" in unmatched[0]
    assert any(f"val: 2 of {TINY['n_val']} images have no record" in w for w in warnings)


def test_parquet_layout_without_ocr_names_the_fix_and_caption_text_needs_none(tmp_path, cache):
    root = write_parquet_layout(tmp_path / "parquet", cache)
    checks = _prepare(root, tmp_path / "a")["data_checks"]
    (warning,) = [w for w in checks["warnings"] if "no OCR records" in w]
    assert "train, val, test" in warning and "data.ocr_dir" in warning and "text view" in warning
    assert not any("OCR" in w for w in _prepare(root, tmp_path / "b", text_source="caption")["data_checks"]["warnings"])
    # with the OCR files in data.ocr_dir the warning is gone
    ocr = tmp_path / "ocr"
    ocr.mkdir()
    for split in ("train", "val", "test"):
        (ocr / ocr_name(split)).write_bytes((cache / "generated" / ocr_name(split)).read_bytes())
    assert not any("OCR" in w for w in _prepare(root, tmp_path / "c", ocr_dir=str(ocr))["data_checks"]["warnings"])


def test_a_parquet_file_corrupt_inside_names_the_file(tmp_path, cache):
    root = write_parquet_layout(tmp_path / "parquet", cache)
    path = root / "data" / "train-00000-of-00001.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    column = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "image_id")
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 32] = bytes(range(32))  # the image_id column's first page header; the footer is intact
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet: parquet file cannot be read to the end"):
        _prepare(root, tmp_path / "prepared")


def test_generated_data_at_a_path_trains_in_spurious_mode(tmp_path):
    # the generator's files keep their groups: spurious mode on them is no contradiction
    root = tmp_path / "gen"
    generate(root, {**TINY, "majority_frac": 0.9})
    info = _prepare(root, tmp_path / "prepared", mode="spurious")
    assert info["data_checks"]["rows"]["train"] == TINY["n_train"] and info["data_checks"]["dropped"] == []


def test_parquet_rows_keep_their_captions(tmp_path, cache):
    root = write_parquet_layout(tmp_path / "parquet", cache)
    table = pq.read_table(root / "data" / "val-00000-of-00001.parquet")
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert {"image_id", "image_classes", "caption_str", "reference_strs", "question_id"} <= set(table.column_names)
    assert table.num_rows == TINY["n_val"]
