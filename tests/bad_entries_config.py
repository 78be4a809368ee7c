"""Entry points of the config cases that need the host arranged first (tests/data/bad/cases_config.yaml)."""
from __future__ import annotations

from pathlib import Path

from bad_support import raised
from tunewise.cli import main


def _validate(file: Path):
    from tunewise.config import load_yaml
    from tunewise.experiment import validate

    return raised(lambda: validate(load_yaml(file)))


def config_no_gpu(tmp_path, monkeypatch, file: Path):
    """The config on a host where no GPU is visible (CUDA_VISIBLE_DEVICES=-1 hides any the host has)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    return _validate(file)


def config_symlink_loop(tmp_path, monkeypatch, file: Path):
    """config.yaml -> other.yaml -> config.yaml; `tunewise validate` of it exits 2 too."""
    first, second = tmp_path / "config.yaml", tmp_path / "other.yaml"
    first.symlink_to(second)
    second.symlink_to(first)
    assert main(["validate", str(first)]) == 2
    return _validate(first)


ENTRY_POINTS = {"config_no_gpu": config_no_gpu, "config_symlink_loop": config_symlink_loop}
