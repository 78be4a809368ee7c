"""Entry points of the latent trainer's bad-input cases (tests/data/bad/cases_latent.yaml) that the shared ones
in test_bad_inputs.py cannot express: a data.path that is not a file (a folder, a symlink loop), made at test
time since git cannot hold the one without content nor, safely, the other."""
from __future__ import annotations

from pathlib import Path

import yaml

from bad_support import raised

REPO = Path(__file__).resolve().parents[1]


def _validate_latent(monkeypatch, path: Path) -> Exception:
    """Config validation (`tunewise validate`/`resolve` and the Snakefile parse) of config/test.yaml's latent_tiny
    with data.path = path: where a path that is no table file must stop, before any job."""
    from tunewise.experiment import validate

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["experiments"]["latent_tiny"]["data"] = {"source": "path", "path": str(path), "targets": ["PF_p", "S_p"]}
    return raised(validate, config)


def _latent_path_is_directory(tmp_path, monkeypatch, file: Path):
    folder = tmp_path / "compounds.csv"  # a folder that even looks like a table by its name
    folder.mkdir()
    (folder / "part-0.csv").write_text("d1,PF_p,S_p\n1,2,3\n")
    return _validate_latent(monkeypatch, folder)


def _latent_symlink_loop(tmp_path, monkeypatch, file: Path):
    link = tmp_path / "compounds.csv"
    link.symlink_to(link)
    return _validate_latent(monkeypatch, link)


ENTRY_POINTS = {
    "latent_path_is_directory": _latent_path_is_directory,
    "latent_symlink_loop": _latent_symlink_loop,
}
