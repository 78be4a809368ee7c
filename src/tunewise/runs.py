"""The run-directory contract.

    config.yaml    resolved trainer config
    history.csv    one row per epoch
    metrics.json   final/best metrics (written last: its presence means the run ended)
    run.json       status running|done|diverged|failed|pruned, reason, seed, git sha, host, mlflow run id
    checkpoints/   best.pt, last.pt

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
            **(meta or {}),
        }
        write_json(self.run_json_path, info)
        return info

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

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict | None:
        path = self.checkpoints / name
        if not path.exists():
            return None
        return load_checkpoint(path, map_location)

    def history(self):
        import pandas as pd

        return pd.read_csv(self.history_path)

    def config(self) -> dict:
        with open(self.config_path, encoding="utf-8") as f:
            return yaml.safe_load(f)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True; a damaged file becomes a clear error naming it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from e
