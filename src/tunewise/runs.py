"""The run-directory contract.

    config.yaml    resolved trainer config
    history.csv    one row per epoch (read_history, RunDir.write_history)
    metrics.json   final/best metrics (written last: its presence means the run ended; RunDir.finish/metrics)
    run.json       status running|done|diverged|failed|pruned, reason, seed, git sha, host, mlflow run id
    checkpoints/   best.pt, last.pt

This module is the one reader and writer of these files. JSON cannot hold infinities: write_json writes them
as the strings "inf"/"-inf" (NaN as null), and finite_float reads any number back, None when not finite.

Every file is replaced atomically (temporary file + os.replace), so a killed job leaves either
the old file or the new one, never half of one, and never a run that looks finished.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

FINISHED = {"done", "diverged", "pruned"}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong with it."""


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_if_exists(path: Path | None) -> Any:
    """read_json for a file that may not be there yet (a phase not run, an optional table): None then."""
    return read_json(path) if path is not None and Path(path).is_file() else None


def finite_float(value: Any) -> float | None:
    """A finite float from a value read back from JSON, else None: numbers (numpy scalars too) and numeric
    strings count, while None, booleans, words and the "inf"/"-inf" strings write_json leaves for infinities
    (NaN is written as null) do not."""
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_history(run_dir: str | os.PathLike):
    """history.csv of a run directory as a DataFrame; an empty one when the run wrote none (or only an empty
    file): a run that stopped before its first epoch has no curves, which is a finding, not an error."""
    import pandas as pd

    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_user_json(path: Path) -> Any:
    """A user's JSON file; one that is not UTF-8 or not JSON (an HTML error page saved by a failed download, a
    file cut short) becomes a ValueError naming the file, the problem and where it is."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); JSON files must be UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# optional in a run directory: a trainer's validation confusion matrix per evaluated step,
# {"split": "val", "classes": [...], "steps": {"<step>": [[count true x predicted]]}}; the reports show the best step's
CONFUSION_FILE = "confusion_val.json"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.history_path = self.path / "history.csv"
        self.metrics_path = self.path / "metrics.json"
        self.run_json_path = self.path / "run.json"
        self.checkpoints = self.path / "checkpoints"

    # --- state -----------------------------------------------------------------------------
    def info(self) -> dict:
        return read_json(self.run_json_path) if self.run_json_path.exists() else {}

    @property
    def status(self) -> str | None:
        return self.info().get("status")

    def is_finished(self) -> bool:
        return self.metrics_path.exists() and self.status in FINISHED

    def require_finished(self) -> dict:
        """metrics.json of a finished run, or a clear error naming the run and its state."""
        if not self.metrics_path.exists() or self.status not in FINISHED:
            raise RuntimeError(
                f"run {self.path} is not finished (status: {self.status or 'missing run.json'}); "
                "run its training job first"
            )
        return read_json(self.metrics_path)

    # --- writing ---------------------------------------------------------------------------
    def start(self, config: dict, seed: int, meta: dict | None = None) -> dict:
        """Begin or resume: keeps the MLflow run id of an interrupted attempt."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        previous = self.info()
        self.metrics_path.unlink(missing_ok=True)  # an unfinished run never carries old final metrics
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))
        info = {
            "status": "running",
            "reason": None,
            "seed": seed,
            "git_sha": git_sha(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempt": int(previous.get("attempt", 0)) + 1,
            "mlflow_run_id": previous.get("mlflow_run_id"),
            # where the attempt ran: a cluster job (requeued jobs keep their id) and the GPUs it was given
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **(meta or {}),
        }
        if previous:
            # how the earlier starts ended, since each start rewrites the job's log: killed (still "running"),
            # interrupted, out of memory and at which batch size, requeued
            ended = {k: previous[k] for k in ("attempt", "status", "reason", "started", "batch_size", "slurm_job_id")
                     if previous.get(k) is not None}
            if ended.get("status") == "running":
                ended["status"] = "killed"
            info["earlier"] = [*previous.get("earlier", []), ended]
        write_json(self.run_json_path, info)
        return info

    def clear(self) -> None:
        """Forget the training of an earlier start (checkpoints, history, final metrics): the next start trains
        from scratch. For a run whose config changed since, whose batch was made smaller after running out of
        memory, or that is trained again on purpose: resuming its last.pt would mix two trainings."""
        import shutil

        shutil.rmtree(self.checkpoints, ignore_errors=True)
        for path in (self.history_path, self.metrics_path, self.path / CONFUSION_FILE):
            path.unlink(missing_ok=True)

    def update_info(self, **fields: Any) -> None:
        info = self.info()
        info.update(fields)
        write_json(self.run_json_path, info)

    def write_history(self, rows: list[dict]) -> None:
        """Rewrite history.csv from rows (used on resume and after each epoch)."""
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        lines = []
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
        lines.append(buf.getvalue())
        atomic_write_text(self.history_path, "".join(lines))

    def finish(self, metrics: dict, status: str = "done", reason: str | None = None) -> None:
        metrics = {"status": status, **{k: v for k, v in metrics.items() if k != "status"}}
        if reason:
            metrics["reason"] = reason
        write_json(self.metrics_path, metrics)
        # run.json last: only now does the run look finished to phases that check status
        self.update_info(status=status, reason=reason, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def fail(self, reason: str, status: str = "failed") -> None:
        self.update_info(status=status, reason=reason)

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict) -> Path:
        import torch

        path = self.checkpoints / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load_checkpoint(self, name: str, map_location: Any = "cpu", required: tuple[str, ...] = ()) -> dict | None:
        """This run's own checkpoint (what a resume reads), None when there is none yet."""
        path = self.checkpoints / name
        if not path.exists():
            return None
        try:
            return load_checkpoint(path, map_location, required)
        except CheckpointError as e:
            # the job resumes from this file on every rerun, so without the way out it would fail forever
            raise CheckpointError(f"{e}; delete it to train this run from scratch") from e

    def history(self):
        """history.csv (an empty frame when there is none: read_history)."""
        return read_history(self.path)

    def metrics(self) -> dict:
        """metrics.json as written, {} while the run has none (unfinished runs: use require_finished)."""
        return read_json(self.metrics_path) if self.metrics_path.exists() else {}

    def config(self) -> dict:
        with open(self.config_path, encoding="utf-8") as f:
            return yaml.safe_load(f)


def refuse_lfs_pointer(path: Path) -> None:
    """A Git LFS pointer where a checkpoint should be (a clone without `git lfs pull`) is a CheckpointError; it is
    told by its first bytes, without torch, so a config naming one is refused when it is validated."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"checkpoint {path} is a Git LFS pointer, not the checkpoint itself (run `git lfs pull`)")


def load_checkpoint(path: Path, map_location: Any = "cpu", required: tuple[str, ...] = ()) -> dict:
    """torch.load with weights_only=True (no pickled code runs); a file that cannot serve as a checkpoint
    becomes a CheckpointError naming it and the problem, with the `required` keys checked."""
    import pickle

    import torch

    path = Path(path)
    refuse_lfs_pointer(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_load_problem(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} cannot be loaded: it holds a {type(state).__name__}, not a dict of states")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: it lacks {', '.join(missing)} (it has {', '.join(map(str, state))})"
        )
    return state


def _load_problem(error: BaseException) -> str:
    """torch's load errors in one line: they run to a screen of advice, some of it (load with
    weights_only=False) wrong for a file of unknown origin."""
    import re

    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled Python object ({refused.group(1)}) besides tensors, and only tensors and "
                "plain containers are loaded (weights_only=True); save state dicts, not objects")
    if "weights only load failed" in text.lower() or "unpickl" in type(error).__name__.lower():
        return "it is not a torch.save file (not a zip archive of tensors)"
    if "zip archive" in text or isinstance(error, EOFError):
        return "the file is truncated or corrupted (an incomplete torch.save archive)"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
