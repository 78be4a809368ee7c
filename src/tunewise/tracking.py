"""MLflow tracking: one MLflow experiment per tunewise experiment, a run per phase,
seed runs as children, per-epoch metrics with steps.

Parallel jobs share one SQLite file by default, which answers "database is locked" under
load: every write goes through `_retry`, and the database is created under a file lock
before jobs fan out. History.csv stays the source of truth; `EpochReporter.replay` re-sends
rows a killed job never got to log, so a resumed run loses no metric.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_URI = "sqlite:///mlflow.db"
_TRANSIENT = ("database is locked", "database table is locked", "OperationalError", "Connection", "timed out", "503", "502")

log = logging.getLogger(__name__)


def resolve_uri(configured: str | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def _retry(fn: Callable, *args, attempts: int = 12, **kwargs):
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow wraps SQLAlchemy/HTTP errors in several types
            text = f"{type(e).__name__}: {e}"
            if attempt == attempts - 1 or not any(t in text for t in _TRANSIENT):
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, uri: str | None, experiment: str):
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = resolve_uri(uri)
        if self.uri.startswith("sqlite:///"):
            # the first client creates the schema: under a lock, so parallel jobs never race migrations
            db = Path(self.uri[len("sqlite:///"):])
            with FileLock(str(db) + ".lock", timeout=300):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._ensure_experiment(experiment)
        else:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = _retry(self._ensure_experiment, experiment)

    def _ensure_experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created by a concurrent job between the two calls
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, run_name: str, tags: dict[str, Any], parent_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if parent_id:
            # the tag nests the run in the UI whatever the parent's state (ecosystem.md)
            tags["mlflow.parentRunId"] = parent_id
        run = _retry(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def resume_run(self, run_id: str) -> str:
        _retry(self.client.update_run, run_id, status="RUNNING")
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            items.append(Metric(k, float(v), now, int(step or 0)))
        for i in range(0, len(items), 500):
            _retry(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def log_rows(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """Many steps' metrics (each row has its `step`) in as few batches as MLflow allows."""
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k != "step" and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ]
        for i in range(0, len(items), 1000):  # MLflow's log_batch limit
            _retry(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            _retry(self.client.log_artifact, run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, run_id, status=status)

    def max_logged_step(self, run_id: str, key: str) -> int:
        history = _retry(self.client.get_metric_history, run_id, key)
        return max((m.step for m in history), default=0)

    def parent_run(self, run_name: str, tags: dict[str, Any], state_file: Path) -> str:
        """A phase parent shared by many jobs (e.g. all seed runs), created once."""
        from filelock import FileLock

        from tunewise.runs import read_json, write_json

        with FileLock(str(state_file) + ".lock", timeout=300):
            state = read_json(state_file) if state_file.exists() else {}
            run_id = state.get(run_name)
            if run_id:
                try:
                    _retry(self.client.get_run, run_id)
                    return run_id
                except Exception:
                    pass  # the tracking store was reset; make a new parent
            run_id = self.start_run(run_name, tags)
            state[run_name] = run_id
            write_json(state_file, state)
            return run_id


class EpochReporter:
    """What a trainer's loop calls each epoch: logs the row to MLflow (history.csv is written by the loop).
    A sweep's reporter wraps this to raise Pruned.

    Rows are sent in batches, at most every `flush_every` seconds and on `flush()`: one SQLite transaction
    per epoch made parallel jobs queue on the store's write lock. Nothing is lost by waiting: history.csv
    holds every row, and `replay` sends what an interrupted run never flushed."""

    def __init__(self, tracker: Tracker | None, run_id: str | None, flush_every: float = 5.0):
        self.tracker = tracker
        self.run_id = run_id
        self.flush_every = flush_every
        self._pending: list[dict] = []
        self._last_flush = time.monotonic()

    def epoch(self, step: int, row: dict) -> None:
        if not (self.tracker and self.run_id):
            return
        self._pending.append({**row, "step": step})
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._pending and self.tracker and self.run_id:
            self.tracker.log_rows(self.run_id, self._pending)
        self._pending = []
        self._last_flush = time.monotonic()

    def replay(self, rows: list[dict]) -> None:
        if not (self.tracker and self.run_id and rows):
            return
        self.flush()
        key = next((k for k in rows[-1] if k not in ("step",)), None)
        done = self.tracker.max_logged_step(self.run_id, key) if key else 0
        missing = [row for row in rows if row["step"] > done]
        if missing:
            self.tracker.log_rows(self.run_id, missing)
