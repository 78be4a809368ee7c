"""MLflow tracking: one MLflow experiment per tunewise experiment, a run per phase,
seed runs as children, per-epoch metrics with steps.

Parallel jobs share one SQLite file by default, which answers "database is locked" under
load: every write goes through `_retry`, and the database is created under a file lock
before jobs fan out. Against an `mlflow server` (http://...) the same retries ride out a
server that is starting, restarting or answering 5xx; one that stays away fails with a
TrackingError naming it. History.csv stays the source of truth; `EpochReporter.replay`
re-sends rows a killed job never got to log, so a resumed run loses no metric.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_URI = "sqlite:///mlflow.db"
RETRY_ENV = "TUNEWISE_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 120.0  # long enough for a tracking server to restart, short enough to fail a job visibly
# What MLflow says for a busy SQLite store, and, through a server, for refused or dropped connections and for
# 5xx answers (its HTTP client reports those as "Max retries exceeded ... too many 503 error responses")
_TRANSIENT = ("database is locked", "database table is locked", "OperationalError", "Connection", "timed out",
              "Max retries exceeded", "RemoteDisconnected", "TEMPORARILY_UNAVAILABLE", "503", "502", "504")

log = logging.getLogger(__name__)


def resolve_uri(configured: str | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


class TrackingError(RuntimeError):
    """The tracking store kept failing with transient errors for the whole retry budget."""


def _transient(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(t in text for t in _TRANSIENT)


def retry_budget() -> float:
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)


def _retry(fn: Callable, *args, uri: str | None = None, budget: float | None = None, **kwargs):
    """Call fn until it succeeds or a non-transient error comes; transient ones are retried with backoff
    for `budget` seconds (TUNEWISE_TRACKING_RETRY_S), then end in a TrackingError naming the store."""
    budget = retry_budget() if budget is None else budget
    started, delay, attempt = time.monotonic(), 0.05, 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow wraps SQLAlchemy/HTTP errors in several types
            if not _transient(e):
                raise
            elapsed = time.monotonic() - started
            if elapsed >= budget:
                raise TrackingError(_gave_up(uri or DEFAULT_URI, e, attempt, elapsed)) from e
            time.sleep(min(delay * (1 + random.random()), max(0.0, budget - elapsed)))
            delay = min(delay * 2, 5.0)


def _gave_up(uri: str, e: Exception, attempts: int, elapsed: float) -> str:
    hint = (f"is `mlflow server` running at {uri} and reachable from this host?" if uri.startswith(("http://", "https://"))
            else "is another process holding the database for this long?")
    return (f"MLflow tracking store {uri} still failing after {attempts} attempts over {elapsed:.1f} s "
            f"({RETRY_ENV}={retry_budget():g}): {hint} Last error: {type(e).__name__}: {str(e)[:500]}")


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
            if "'" in str(Path.cwd()):
                # MLflow (3.17) writes its Default experiment's artifact path, ./mlruns made absolute, into an
                # SQL statement without parameters: a quote there is an SQL syntax error deep in SQLAlchemy
                raise TrackingError(
                    f"MLflow cannot create a SQLite store while the working directory contains a single quote "
                    f"({Path.cwd()}): run the workflow from a folder without one, or use an MLflow server "
                    "(tracking.uri: http://...)")
            # the first client creates the schema: under a lock, so parallel jobs never race migrations
            db = Path(self.uri[len("sqlite:///"):])
            with FileLock(str(db) + ".lock", timeout=300):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._ensure_experiment(experiment)
        else:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._call(self._ensure_experiment, experiment)

    def _call(self, fn: Callable, *args, **kwargs):
        return _retry(fn, *args, uri=self.uri, **kwargs)

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
        run = self._call(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def resume_run(self, run_id: str) -> str:
        self._call(self.client.update_run, run_id, status="RUNNING")
        # an earlier attempt that failed left its verdict: the run is going again, so it no longer holds
        tags = self._call(self.client.get_run, run_id).data.tags
        for key in ("status", "reason"):
            if key in tags:
                self._call(self.client.delete_tag, run_id, key)
        return run_id

    def run_status(self, run_id: str) -> str | None:
        """RUNNING, FINISHED, FAILED or KILLED; None when the store has no such run (reset, or deleted)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._call(self.client.get_run, run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run.info.status

    def running_runs(self, tag: str, value: str) -> list[str]:
        """Ids of this experiment's RUNNING runs whose `tag` is `value` (the runs of one run directory)."""
        value = value.replace("\\", "\\\\").replace("'", "\\'")
        runs = self._call(self.client.search_runs, [self.experiment_id],
                          filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'")
        return [r.info.run_id for r in runs]

    def supersede(self, run_id: str, reason: str, finished_too: bool = False) -> None:
        """End the run of an attempt that was killed and will not be continued (another run replaces it):
        KILLED and tagged status=interrupted, kept for the record, never counted as a result. `finished_too`:
        also a run that finished but whose result was never used (a sweep trial killed before it was told)."""
        if self.run_status(run_id) in (("RUNNING", "FINISHED") if finished_too else ("RUNNING",)):
            self.set_tags(run_id, {"status": "interrupted", "reason": reason})
            self.end_run(run_id, "KILLED")

    def log_params(self, run_id: str, params: dict, only_new: bool = False) -> None:
        """`only_new`: leave the params the run already has (a resumed run: its threads or device may differ
        this time, and MLflow refuses to change a param)."""
        from mlflow.entities import Param

        flat = _flatten(params)
        if only_new:
            have = self._call(self.client.get_run, run_id).data.params
            flat = {k: v for k, v in flat.items() if k not in have}
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # a summary metric (no step) the run already holds with this value is not logged again: a job that
        # reruns after a kill would otherwise add a second point to its history
        have = self._call(self.client.get_run, run_id).data.metrics if step is None else {}
        items = []
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if have.get(k) == float(v):
                continue
            items.append(Metric(k, float(v), now, int(step or 0)))
        for i in range(0, len(items), 500):
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 500])

    def log_rows(self, run_id: str, rows: list[dict[str, Any]], logged: dict[str, int] | None = None) -> None:
        """Many steps' metrics (each row has its `step`) in as few batches as MLflow allows; with `logged`
        (logged_steps), a metric at a step the run already holds is left out, so nothing is doubled."""
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged = logged or {}
        items = [
            Metric(k, float(v), now, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k != "step" and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and int(row["step"]) > logged.get(k, 0)
        ]
        for i in range(0, len(items), 1000):  # MLflow's log_batch limit
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, profile: dict | None = None,
                    context: str = "train") -> None:
        """The data a run used, as an MLflow dataset input (the UI's Dataset column): a local folder `source`,
        identified by `digest` (a fingerprint of its content or settings)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                          profile=json.dumps(profile) if profile else None)
        self._call(self.client.log_inputs, run_id,
                   datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

    def has_dataset(self, run_id: str) -> bool:
        return bool(self._call(self.client.get_run, run_id).inputs.dataset_inputs)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status=status)

    def max_logged_step(self, run_id: str, key: str) -> int:
        history = self._call(self.client.get_metric_history, run_id, key)
        return max((m.step for m in history), default=0)

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """The last step logged for each metric of the run. Per metric, because a batch cut off by a kill (or
        a row whose value was not finite) leaves metrics of one step logged and others not."""
        keys = self._call(self.client.get_run, run_id).data.metrics
        return {key: self.max_logged_step(run_id, key) for key in keys}

    def parent_run(self, run_name: str, tags: dict[str, Any], state_file: Path) -> str:
        """A phase parent shared by many jobs (e.g. all seed runs), created once."""
        from filelock import FileLock

        from tunewise.runs import read_json, write_json

        with FileLock(str(state_file) + ".lock", timeout=300):
            state = read_json(state_file) if state_file.exists() else {}
            run_id = state.get(run_name)
            if run_id:
                try:
                    self._call(self.client.get_run, run_id)
                    return run_id
                except TrackingError:
                    raise  # the store is unreachable, not reset
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
        self._logged: dict[str, int] = {}  # what the run held when it resumed (sync): never sent twice

    def epoch(self, step: int, row: dict) -> None:
        if not (self.tracker and self.run_id):
            return
        self._pending.append({**row, "step": step})
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._pending and self.tracker and self.run_id:
            self.tracker.log_rows(self.run_id, self._pending, self._logged)
        self._pending = []
        self._last_flush = time.monotonic()

    def sync(self) -> None:
        """Learn what the (resumed) run already holds: rows logged before a kill are not sent again, even
        when the resumed training reaches their steps once more (a run that restarts from its first epoch)."""
        if self.tracker and self.run_id:
            self._logged = self.tracker.logged_steps(self.run_id)

    def replay(self, rows: list[dict]) -> None:
        """Send the rows of history.csv a killed attempt never got to log (each metric from its own last step)."""
        if not (self.tracker and self.run_id and rows):
            return
        self.flush()
        self.sync()
        self.tracker.log_rows(self.run_id, rows, self._logged)
