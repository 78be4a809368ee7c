"""What the Snakefile parse and the light jobs import: no torch, no MLflow.

Snakemake parses the Snakefile for `snakemake -n`, at every start and, on a cluster, in every job; the parse
validates the config through each trainer's spec. The light jobs (resolve, diagnose, gate, significance,
select-best, report-index) read a trainer's knobs and settings the same way. Importing torch costs seconds each
time, so these tests run each entry in a fresh interpreter and look at sys.modules.
"""
import re
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


# --- the import order: runs/config <- trainers <- experiment <- phases <- reports <- cli ---------------------

SRC = __import__("pathlib").Path(__file__).resolve().parents[1] / "src"
LAYERS = {  # a module may import its own layer and the layers below, never one above
    "tunewise": 0, "runs": 0, "config": 0, "space": 0, "devices": 0, "tracking": 0, "thresholds": 0, "retries": 0, "paths": 0,
    "train": 1, "trainers": 1,
    "experiment": 2,
    "phases": 3,
    "reports": 4,
    "cli": 5,
}


def _modules() -> dict:
    out = {}
    for path in (SRC / "tunewise").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path, modules: dict, top_level_only: bool) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


# a trainer's report sections (`report_sections`) live beside it but belong to the report layer: the trainer
# names them as strings and never imports them; the report writers do
REPORT_SECTION_MODULE = re.compile(r"^tunewise\.trainers\.[a-z_]+\.report$")


def _layer(module: str) -> int:
    if REPORT_SECTION_MODULE.match(module):
        return LAYERS["reports"]
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def test_every_module_has_a_layer_and_imports_none_above_it():
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        for target in sorted(_imports(name, path, modules, top_level_only=False)):  # lazy imports count too
            if _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "lazy imports too"])
def test_no_import_cycle_between_modules(top_level_only):
    """No cycle at import time, and none through the imports a function makes when it runs (render once imported
    the section writers in its functions while they imported render's helpers at the top)."""
    import graphlib

    modules = _modules()
    graph = {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}
    # a package's __init__ is imported on the way to its submodules: that is not a cycle of their own making
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_no_module_imports_another_modules_private_names():
    """What modules share is public, in the module that owns it (the report writers' link, fmt and render live in
    reports/markdown.py): a `_name` imported from elsewhere is a helper that belongs to neither."""
    import ast

    found = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunewise") and node.module != name:
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # dunders are public
    assert found == []


# --- trainer knowledge stays in trainers/ ---------------------------------------------------------------------

TRAINER_NAME = re.compile(r"\b(" + "|".join(sorted(BUILTIN)) + r")\b", re.IGNORECASE)


def test_no_builtin_trainer_is_named_outside_trainers():
    """What a trainer needs (a preparation step, report sections, a design phase, its thresholds) it declares in
    its capabilities: the workflow and the phases never name one, so a fourth trainer touches only trainers/."""
    root = SRC.parent
    files = [p for p in (SRC / "tunewise").rglob("*") if p.is_file() and p.suffix in (".py", ".j2")
             and "trainers" not in p.relative_to(SRC / "tunewise").parts[:1]]
    files += [p for p in (root / "workflow").rglob("*") if p.is_file()] + [root / "Snakefile"]
    named = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in sorted(files)
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if TRAINER_NAME.search(line)]
    assert len(files) > 40
    assert named == []


def test_the_builtin_report_sections_are_report_layer_modules_that_load():
    """A built-in trainer's sections live in its `report` module (the report layer, per the rule above) and load."""
    from tunewise.reports.sections import load_section

    declared = [t for name in SPECS for t in get_spec(name).report_sections]
    assert len(declared) >= 2
    for target in declared:
        assert REPORT_SECTION_MODULE.match(target.partition(":")[0]), target
        assert callable(load_section(target))
