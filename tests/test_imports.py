"""What the Snakefile parse and the light jobs import: no torch, no MLflow.

Snakemake parses the Snakefile for `snakemake -n`, at every start and, on a cluster, in every job; the parse
validates the config through each trainer's spec. The light jobs (resolve, diagnose, gate, significance,
select-best, report-index) read a trainer's knobs and settings the same way. Importing torch costs seconds each
time, so these tests run each entry in a fresh interpreter and look at sys.modules.
"""
import subprocess
import sys

import pytest

from tunewise.trainers import BUILTIN, SPECS, get_spec, get_trainer

HEAVY = ("torch", "mlflow", "torchvision", "open_clip")


def _imported(code: str, cwd) -> set[str]:
    probe = f"{code}\nimport sys\nprint('imported:', *(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.splitlines()[-1].split()[1:])


def test_validating_the_default_config_imports_neither_torch_nor_mlflow(repo):
    code = ("from tunewise.cli import main\n"
            "assert main(['validate', 'config/config.yaml']) in (0, None)")
    assert _imported(code, repo) == set()


def test_the_light_phases_and_every_builtin_spec_import_no_torch(repo):
    code = ("import tunewise.phases.diagnose, tunewise.phases.recommend, tunewise.phases.gates\n"
            "import tunewise.phases.significance, tunewise.phases.decision, tunewise.config\n"
            "from tunewise.trainers import SPECS, get_spec\n"
            "for name in SPECS:\n"
            "    spec = get_spec(name)\n"
            "    spec.search_space(); spec.knobs\n")
    assert _imported(code, repo) == set()


def test_the_training_side_does_import_torch(repo):
    # the probe above would pass if nothing were ever imported: the trainers themselves do load torch
    assert "torch" in _imported("from tunewise.trainers import get_trainer; get_trainer('latent')", repo)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_builtin_trainer_is_its_spec_plus_training(name):
    """The spec validation uses and the trainer a job trains with agree on everything the spec declares."""
    spec, trainer = get_spec(name), get_trainer(name)
    assert set(SPECS) == set(BUILTIN)
    assert isinstance(trainer, type(spec))
    for attr in ("name", "primary_metric", "direction", "knobs", "open_config_keys"):
        assert getattr(trainer, attr) == getattr(spec, attr), attr
    assert trainer.default_config() == spec.default_config()
    assert trainer.search_space() == spec.search_space()
    assert getattr(trainer, "diagnosis_thresholds", None) == getattr(spec, "diagnosis_thresholds", None)
