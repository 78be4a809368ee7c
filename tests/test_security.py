"""Security: no config value reaches a shell unquoted, checkpoints load with weights_only=True, YAML with
safe_load, services bind to 127.0.0.1. Static checks over the sources, and a workflow run in a folder whose
path is full of shell metacharacters."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunewise.config import ConfigError
from tunewise.experiment import validate

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))

# unquoted in a rule's shell line only where Snakemake itself guarantees an integer or a fixed word:
# threads and resources are numbers; these wildcards are constrained to digits or an enumeration
UNQUOTED_OK = {"threads", "resources.gpu", "resources.attempt", "wildcards.side", "wildcards.seed", "wildcards.trial", "wildcards.round"}
CONSTRAINTS = {"side": "baseline|optimized", "seed": r"\d+", "trial": r"\d+", "round": r"\d+"}


def _shell_placeholders():
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        for block in re.finditer(r"\n    shell:\n((?:        .*\n)+)", text):
            for placeholder in re.findall(r"\{([^{}]+)\}", block.group(1)):
                yield path.name, placeholder


def test_every_shell_placeholder_is_quoted_or_a_number():
    found = list(_shell_placeholders())
    assert len(found) > 40, "the rules' shell lines were not found"
    unquoted = {(name, p) for name, p in found if not p.endswith(":q") and p not in UNQUOTED_OK}
    assert not unquoted, f"rule shell placeholders a config value could reach unquoted: {sorted(unquoted)}"


def test_the_unquoted_wildcards_only_match_digits_or_fixed_words():
    smk = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    for name, pattern in CONSTRAINTS.items():
        assert re.search(rf"\b{name}=r?\"{re.escape(pattern)}\"", smk), f"wildcard {name!r} is not constrained to {pattern}"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield owner, name, node


def _kw(node, key):
    return next((k.value for k in node.keywords if k.arg == key), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_sources_load_safely_and_never_hand_strings_to_a_shell(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for owner, name, node in _calls(tree):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if owner == "torch" and name == "load":
            flag = _kw(node, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: torch.load without weights_only=True"
        if owner == "yaml":
            assert name not in ("load", "load_all", "unsafe_load", "full_load"), f"{where}: yaml.{name}; use safe_load"
        if owner == "os":
            assert name not in ("system", "popen"), f"{where}: os.{name} runs a shell"
        if owner == "subprocess" or name in ("Popen", "run", "check_output", "check_call", "call"):
            shell = _kw(node, "shell")
            assert not (isinstance(shell, ast.Constant) and shell.value), f"{where}: subprocess with shell=True"
        assert not (owner == "pickle" and name in ("load", "loads")), f"{where}: pickle.{name} runs code from a file"


@pytest.mark.parametrize("name", ["x; touch pwned", "$(touch pwned)", "a b", "`id`", "x'y", "../up", "-rf"])
def test_experiment_names_with_shell_metacharacters_are_refused_by_name(name):
    config = {"experiments": {name: {"trainer": "latent", "data": {"source": "embedded", "limit": 100}}}}
    with pytest.raises(ConfigError, match=re.escape(repr(name)[1:-1])):
        validate(config)


def test_a_single_quote_in_the_working_directory_is_a_clear_tracking_error(tmp_path, monkeypatch):
    from tunewise.tracking import Tracker, TrackingError

    work = tmp_path / "it's here"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(TrackingError, match="single quote"):
        Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")


def test_the_mlflow_ui_target_binds_to_localhost_only():
    makefile = (REPO / "Makefile").read_text()
    ui = [line for line in makefile.splitlines() if re.search(r"\bmlflow (ui|server)\b", line)]
    assert ui and all("--host 127.0.0.1" in line for line in ui), ui
    for path in [REPO / "Makefile", REPO / "README.md", *SOURCES, *(REPO / "profiles").rglob("*.yaml")]:
        text = path.read_text()
        assert not re.search(r"--host[ =]0\.0\.0\.0", text), f"{path}: a service bound to every interface"


@pytest.mark.e2e
def test_a_workflow_in_a_path_full_of_shell_metacharacters_runs_and_runs_nothing_else(tmp_path):
    """The work folder, the MLflow database path and a description carry quotes, $(...), backticks and `;`:
    every rule still runs, and none of the embedded commands does."""
    from e2e_support import env

    # (no single quote in the folder: MLflow cannot create a SQLite store under one, and the Tracker says so)
    hostile = "wd $(touch PWNED1); `touch PWNED2` q\" & touch PWNED3 #"
    work = tmp_path / hostile
    work.mkdir()
    config = {
        "tracking": {"uri": f"sqlite:///{work}/ml $(touch PWNED4).db"},
        "experiments": {"toy": {
            "trainer": "toy_trainer:ToyTrainer",
            "description": "; touch PWNED5 && echo $(touch PWNED6) `touch PWNED7` ' \" \\",
            "baseline": {"train": {"epochs": 2}},
            "resources": {"threads": 1, "mem_mb": 500, "runtime": 5},
        }},
    }
    configfile = work / "cfg $(touch PWNED8).yaml"
    configfile.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/toy/diagnosis/diagnosis.json", "-s", str(REPO / "Snakefile"),
         "-d", str(work), "--workflow-profile", str(REPO / "profiles" / "default"), "--configfile", str(configfile),
         "--cores", "2"],
        capture_output=True, text=True, timeout=600, env=env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pwned = [p for p in tmp_path.rglob("PWNED*")] + [p for p in Path.cwd().glob("PWNED*")]
    assert not pwned, f"a shell ran a command from a config value: {pwned}"
    resolved = yaml.safe_load((work / "results" / "toy" / "experiment.yaml").read_text())
    assert resolved["description"] == config["experiments"]["toy"]["description"]
    assert (work / "ml $(touch PWNED4).db").exists()
    assert (work / "results" / "toy" / "diagnosis" / "diagnosis.json").exists()
