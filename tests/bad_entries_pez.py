"""Entry points of the pez bad-input cases (tests/data/bad/cases_pez.yaml), imported by tests/test_bad_inputs.py.

pez_prepare  a pez experiment whose data.path is the case (a folder of images, or the file itself): config
             validation and `tunewise resolve` first; a case they accept then goes through `tunewise prepare-data`.
             Either way the refusal comes before any training (the tiny CLIP included): no experiment.yaml from a
             refused resolve, no ready.json, no meta.json and no trained CLIP from a refused preparation.
pez_made     the same for a case git cannot hold (an empty folder, a symlink loop, a checkpoint that is a folder),
             built at test time from the case's YAML recipe:
               folder: {images: N}      N small noise PNGs in tmp/folder
               symlinks: {name: target} symlinks made in tmp (relative targets)
               mkdirs: [name]           folders made in tmp
               path: name               data.path, relative to tmp
               data: {...}              more data keys; "{tmp}" in a string stands for tmp
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from bad_support import raised


def _refused(tmp_path: Path, data_path: Path, extra: dict | None = None):
    """The exception a pez experiment on data_path raises at the first step that refuses it."""
    from tunewise.cli import build_parser, main
    from tunewise.config import ConfigError
    from tunewise.experiment import validate

    data = {"source": "path", "path": str(data_path), **(extra or {})}
    config = {"experiments": {"p": {"trainer": "pez", "data": data}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    exp_file = tmp_path / "results" / "p" / "experiment.yaml"
    resolve = ["resolve", "--config", str(path), "--experiment", "p", "--out", str(exp_file)]
    try:
        validate(config)
    except ConfigError as e:
        # `tunewise resolve`, the workflow's first job, refuses it too and writes no experiment.yaml
        assert main(resolve) == 2 and not exp_file.exists()
        return e
    assert main(resolve) == 0
    ready = exp_file.parent / "data" / "ready.json"
    args = build_parser().parse_args(["prepare-data", "--experiment-file", str(exp_file), "--out", str(ready)])
    error = raised(args.func, args)
    data_dir = ready.parent
    assert not ready.exists() and not (data_dir / "meta.json").exists()
    assert not (data_dir / "clip" / "clip_metrics.json").exists()  # refused before any CLIP trains
    if data_dir.exists():
        assert not list(data_dir.glob(".*.tmp"))
    return error


def _pez_prepare(tmp_path, monkeypatch, file: Path):
    if file.is_dir():
        target = tmp_path / file.name
        shutil.copytree(file, target)
    else:
        target = tmp_path / file.name
        shutil.copyfile(file, target)
    return _refused(tmp_path, target)


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def _pez_made(tmp_path, monkeypatch, file: Path):
    from PIL import Image

    recipe = yaml.safe_load(file.read_text(encoding="utf-8"))
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(int(recipe.get("folder", {}).get("images", 0))):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    for name in recipe.get("mkdirs", []):
        (tmp_path / name).mkdir()
    for name, target in (recipe.get("symlinks") or {}).items():
        os.symlink(target, tmp_path / name)
    return _refused(tmp_path, tmp_path / recipe["path"], _fill(recipe.get("data") or {}, tmp_path))


ENTRY_POINTS = {"pez_prepare": _pez_prepare, "pez_made": _pez_made}
