import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MPLBACKEND", "Agg")

# the end-to-end tests' shared helpers (Snakemake command, job environment, configs, MLflow runs)
import e2e_support  # noqa: E402,F401


@pytest.fixture
def repo() -> Path:
    return REPO


# --- the order the two CI workers take the files in ---------------------------------------------------------
# `make test` hands out whole files (--dist loadfile: an e2e file's module-scoped workflow run must stay on one
# worker) in collection order, each worker taking the next file when it is done. The longest files must start
# first, or one of them starts last and the other worker idles while it runs. xdist's own reordering sorts files
# by their NUMBER of tests, which puts the e2e files (few tests, minutes each) last; so it is turned off and the
# e2e files come first, longest first (CI's --durations), then every other file in its usual order.
E2E_LONGEST_FIRST = ["test_kills_e2e.py", "test_sweep_e2e.py", "test_iterative_e2e.py", "test_pez_user_data_e2e.py",
                     "test_slurm_e2e.py", "test_pez_e2e.py", "test_textcaps_e2e.py", "test_textcaps_user_data_e2e.py",
                     "test_faults_e2e.py", "test_trainer_capabilities_e2e.py", "test_latent_user_data_e2e.py",
                     "test_example_e2e.py", "test_workflow_e2e.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    with_e2e = {item.path for item in items if item.get_closest_marker("e2e")}

    def rank(item) -> int:
        name = item.path.name
        if name in E2E_LONGEST_FIRST:
            return E2E_LONGEST_FIRST.index(name)
        # another file with e2e tests (test_security's) before the files of unit tests only
        return len(E2E_LONGEST_FIRST) + (0 if item.path in with_e2e else 1)

    # a stable sort by file: tests keep their order within a file (module-scoped fixtures rely on it)
    items.sort(key=rank)
