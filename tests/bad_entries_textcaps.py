"""Entry points of the textcaps bad-input cases (tests/data/bad/cases_textcaps.yaml): a user's TextCaps folder with
a defect, through validation or `tunewise prepare-data`, as the workflow meets it. Each returns the exception raised
(test_bad_inputs.py compares its type and message with the manifest)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from bad_support import raised
from tunewise.cli import build_parser, main


def _copy(tmp_path: Path, case: Path) -> Path:
    root = tmp_path / "textcaps"
    shutil.copytree(case, root)
    return root


def _config(root: Path, **data) -> dict:
    return {"experiments": {"tc": {"trainer": "textcaps", "data": {"source": "path", "path": str(root), **data}}}}


def _assert_not_called_missing(error: Exception) -> None:
    # the folder exists (or is a loop): "(file) not found: <path>" would send the user looking for the wrong thing
    assert "file not found" not in str(error) and "not found:" not in str(error), error


def _validate(config: dict):
    from tunewise.experiment import validate

    error = raised(validate, config)
    _assert_not_called_missing(error)
    return error


def _prepare(tmp_path: Path, config: dict):
    """`tunewise resolve` (it must pass: the defect is in the contents) then `tunewise prepare-data`, refused with
    nothing left that marks the data as ready."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    exp_file = tmp_path / "results" / "tc" / "experiment.yaml"
    assert main(["resolve", "--config", str(path), "--experiment", "tc", "--out", str(exp_file)]) == 0
    ready = exp_file.parent / "data" / "ready.json"
    args = build_parser().parse_args(["prepare-data", "--experiment-file", str(exp_file), "--out", str(ready)])
    error = raised(args.func, args)
    data_dir = ready.parent
    assert not ready.exists()
    if data_dir.exists():
        assert not list(data_dir.glob("*.json")) and not list(data_dir.glob(".*.tmp"))
    return error


def _textcaps_validate(tmp_path, monkeypatch, case: Path):
    return _validate(_config(_copy(tmp_path, case)))


def _textcaps_folder_prepare(tmp_path, monkeypatch, case: Path):
    error = _prepare(tmp_path, _config(_copy(tmp_path, case)))
    _assert_not_called_missing(error)
    return error


def _textcaps_spurious_prepare(tmp_path, monkeypatch, case: Path):
    return _prepare(tmp_path, _config(_copy(tmp_path, case), mode="spurious"))


def _textcaps_symlink_loop(tmp_path, monkeypatch, case: Path):
    loop = tmp_path / "textcaps"
    os.symlink(loop, loop)  # a link to itself: os.stat fails with ELOOP, Path.exists() says False
    return _validate(_config(loop))


ENTRY_POINTS = {
    "textcaps_validate": _textcaps_validate,
    "textcaps_folder_prepare": _textcaps_folder_prepare,
    "textcaps_spurious_prepare": _textcaps_spurious_prepare,
    "textcaps_symlink_loop": _textcaps_symlink_loop,
}
