"""The bad-input corpus (tests/data/bad/, described case by case in its cases*.yaml manifests).

Every malformed input is fed to the entry point that reads it in the workflow and must be refused with the
project's error type (the exact type: a raw JSONDecodeError or UnicodeDecodeError is a ValueError too, and is a
defect), a message naming the problem, and nothing half-written left looking complete. A few cases also go
through the `tunewise` command and `snakemake -n`, the way a user meets them.
"""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bad_support import raised
from e2e_support import env
from tunewise.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad"
# cases.yaml (configs, checkpoints, the first data files) and one manifest per area (cases_<area>.yaml), whose
# entry points live in tests/bad_entries_<area>.py (ENTRY_POINTS there); the format is cases.yaml's
MANIFESTS = sorted(BAD.glob("cases*.yaml"))
CASES = [c for m in MANIFESTS for c in yaml.safe_load(m.read_text(encoding="utf-8"))["cases"]]


def _ids(cases):
    return [c["file"] for c in cases]


def _tunewise() -> str:
    # the console script of this environment: what a Snakemake rule runs
    return str(Path(sys.executable).parent / "tunewise")


def _assert_names_the_problem(case: dict, message: str) -> None:
    missing = [f for f in case["expect"] if f not in message]
    assert not missing, f"{case['file']}: message lacks {missing}:\n{message}"
    assert "Traceback" not in message


# --- the manifest -------------------------------------------------------------------------------------------


def test_manifest_covers_every_file_once_with_twenty_or_more_cases():
    files = sorted(p.name for p in BAD.iterdir() if p not in MANIFESTS)
    listed = [c["file"] for c in CASES]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(listed) == files, f"not in any cases*.yaml: {sorted(set(files) - set(listed))}; " \
                                    f"listed but absent: {sorted(set(listed) - set(files))}"
    assert len(CASES) >= 20
    for c in CASES:
        assert c["entry"] in ENTRY_POINTS, c
        assert c["expect"] and c["what"], c
        assert c["error"] in {"ConfigError", "CliError", "CheckpointError", "ValueError"}, c
        assert set(c.get("also", [])) <= {"cli", "snakemake"}, c


# --- entry points (each returns the exception the input raised) ---------------------------------------------


def _resolve(tmp_path: Path, config: dict, name: str) -> Path:
    """`tunewise resolve` of one experiment, as the workflow's first rule runs it; returns experiment.yaml."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    exp_file = tmp_path / "results" / name / "experiment.yaml"
    assert main(["resolve", "--config", str(path), "--experiment", name, "--out", str(exp_file)]) == 0
    return exp_file


def _latent_experiment(tmp_path: Path, table: Path) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg["experiments"]["latent_tiny"]["data"] = {"source": "path", "path": str(table), "targets": ["PF_p", "S_p"]}
    return _resolve(tmp_path, cfg, "latent_tiny")


def _textcaps_root(tmp_path: Path, file: Path) -> Path:
    root = tmp_path / "textcaps"
    root.mkdir()
    shutil.copyfile(file, root / "TextCaps_0.1_train.json")
    return root


def _prepare(exp_file: Path):
    ready = exp_file.parent / "data" / "ready.json"
    args = build_parser().parse_args(["prepare-data", "--experiment-file", str(exp_file), "--out", str(ready)])
    error = raised(args.func, args)
    # nothing that marks the data as ready: no ready.json (the rule's output), no meta.json (the table's marker),
    # no temporary file left behind
    data_dir = ready.parent
    assert not ready.exists()
    assert not (data_dir / "meta.json").exists()
    if data_dir.exists():
        assert not list(data_dir.glob(".*.tmp"))
    return error


def _config(tmp_path, monkeypatch, file: Path):
    from tunewise.config import load_yaml
    from tunewise.experiment import validate

    monkeypatch.chdir(REPO)  # a config's relative paths start where the workflow runs
    return raised(lambda: validate(load_yaml(file)))


def _latent_prepare(tmp_path, monkeypatch, file: Path):
    return _prepare(_latent_experiment(tmp_path, file))


def _textcaps_prepare(tmp_path, monkeypatch, file: Path):
    root = _textcaps_root(tmp_path, file)
    exp_file = _resolve(tmp_path, {"experiments": {"tc": {"trainer": "textcaps", "data": {"source": "path", "path": str(root)}}}},
                        "tc")
    return _prepare(exp_file)


def _textcaps_load(tmp_path, monkeypatch, file: Path):
    from tunewise.trainers.textcaps.data import load_split

    return raised(load_split, _textcaps_root(tmp_path, file), "train", {})


def _pez_resolve(tmp_path, monkeypatch, file: Path):
    from tunewise.experiment import validate

    data = tmp_path / "shapes"
    data.mkdir()
    shutil.copyfile(file, data / "meta.json")
    config = {"experiments": {"p": {"trainer": "pez", "data": {"source": "path", "path": str(data)}}}}
    error = raised(validate, config)
    # `tunewise resolve`, the workflow's first job, refuses it too and writes no experiment.yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "results" / "p" / "experiment.yaml"
    assert main(["resolve", "--config", str(path), "--experiment", "p", "--out", str(out)]) == 2
    assert not out.exists()
    return error


def _checkpoint(tmp_path, monkeypatch, file: Path):
    from tunewise.runs import load_checkpoint

    return raised(load_checkpoint, file)


def _train_resume(tmp_path, monkeypatch, file: Path):
    from tunewise.config import load_experiment
    from tunewise.runs import FINISHED, RunDir

    exp_file = _resolve(tmp_path, {"experiments": {"toy": {"trainer": "toy_trainer:ToyTrainer"}}}, "toy")
    exp = load_experiment(exp_file)
    run = RunDir(tmp_path / "results" / "toy" / "baseline")
    # a start of this very config and seed killed mid-training (run.json still "running"): the rerun resumes
    run.start(exp["baseline"], exp["seed"], {"phase": "baseline", "side": None, "experiment": "toy"})
    shutil.copyfile(file, run.checkpoints / "last.pt")
    argv = ["train", "--experiment-file", str(exp_file), "--run-dir", str(run.path), "--threads", "1"]
    args = build_parser().parse_args(argv)
    error = raised(args.func, args)
    # the run ends failed, with the file named, and nothing that reads as a finished run
    info = run.info()
    assert info["status"] == "failed" and info["status"] not in FINISHED
    assert "last.pt" in info["reason"]
    assert not run.metrics_path.exists() and not run.is_finished()
    # the verb, as a rule runs it: exit code 2 and the message, no traceback; a rerun fails the same way
    assert main(argv) == 2
    assert run.status == "failed" and not run.metrics_path.exists()
    return error


ENTRY_POINTS = {
    "config": _config,
    "latent_prepare": _latent_prepare,
    "textcaps_prepare": _textcaps_prepare,
    "textcaps_load": _textcaps_load,
    "pez_resolve": _pez_resolve,
    "checkpoint": _checkpoint,
    "train_resume": _train_resume,
}
for _module in sorted((REPO / "tests").glob("bad_entries_*.py")):
    ENTRY_POINTS.update(importlib.import_module(_module.stem).ENTRY_POINTS)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    # one tracking database for the module: creating one costs seconds, and a failed run needs only a run id
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input_is_refused_with_a_message_naming_the_problem(case, tmp_path, monkeypatch, capsys, mlflow_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # wins over the configs' tracking.uri
    error = ENTRY_POINTS[case["entry"]](tmp_path, monkeypatch, BAD / case["file"])
    assert type(error).__name__ == case["error"], f"{type(error).__name__}: {error}"
    _assert_names_the_problem(case, str(error))
    if case["entry"] == "train_resume":
        _assert_names_the_problem(case, capsys.readouterr().err)


# --- the same inputs the way a user meets them -------------------------------------------------------------

CLI_CASES = [c for c in CASES if "cli" in c.get("also", [])]
SNAKEMAKE_CASES = [c for c in CASES if "snakemake" in c.get("also", [])]


@pytest.mark.parametrize("case", CLI_CASES, ids=_ids(CLI_CASES))
def test_bad_input_through_the_tunewise_command(case, tmp_path):
    file = BAD / case["file"]
    if case["entry"] == "config":
        argv = ["validate", str(file)]
    elif case["entry"] == "latent_prepare":
        exp_file = _latent_experiment(tmp_path, file)
        argv = ["prepare-data", "--experiment-file", str(exp_file), "--out", str(exp_file.parent / "data" / "ready.json")]
    else:
        raise AssertionError(f"no command for entry {case['entry']}")
    proc = subprocess.run([_tunewise(), *argv], capture_output=True, text=True, cwd=REPO, env=env(), timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"tunewise {argv[0]}: error: "), proc.stderr
    _assert_names_the_problem(case, proc.stderr)
    assert not (tmp_path / "results" / "latent_tiny" / "data" / "ready.json").exists()


@pytest.mark.parametrize("case", SNAKEMAKE_CASES, ids=_ids(SNAKEMAKE_CASES))
def test_bad_config_stops_a_snakemake_dry_run_before_any_job(case, tmp_path):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
           "--configfile", str(BAD / case["file"]), "-n", "--cores", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    missing = [f for f in case["expect"] if f not in out]
    assert not missing, f"snakemake output lacks {missing}:\n{out[-3000:]}"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("step, out, message", [
    ("nope", "data/nope/step.json", "has no preparation step 'nope' (its toy_trainer:CapableToy trainer declares: warmup)"),
    ("warmup", "elsewhere/step.json", "--out must be"),
])
def test_prepare_step_refuses_an_undeclared_step_or_a_misplaced_output(tmp_path, capsys, step, out, message):
    exp_file = _resolve(tmp_path, {"experiments": {"cap": {"trainer": "toy_trainer:CapableToy"}}}, "cap")
    out = tmp_path / "results" / "cap" / out
    argv = ["prepare-step", "--experiment-file", str(exp_file), "--step", step, "--out", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
