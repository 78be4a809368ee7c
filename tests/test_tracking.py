"""MLflow tracking: parallel writers on one SQLite file lose nothing; parents are shared."""
import multiprocessing as mp
from pathlib import Path

from mlflow.tracking import MlflowClient

from tunewise.tracking import EpochReporter, Tracker

STEPS = 25


def _writer(uri: str, i: int) -> str:
    tracker = Tracker(uri, "concurrency")
    run_id = tracker.start_run(f"w{i}", {"phase": "seed"})
    reporter = EpochReporter(tracker, run_id)
    for step in range(1, STEPS + 1):
        reporter.epoch(step, {"val/score": i + step / 100, "train/loss": 1.0 / step, "step": step})
        if step % 5 == 0:
            reporter.flush()  # several transactions per writer, interleaved with the other writers
    reporter.flush()
    tracker.end_run(run_id)
    return run_id


def test_parallel_writers_on_sqlite_lose_no_metric(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mp.get_context("spawn").Pool(8) as pool:
        run_ids = pool.starmap(_writer, [(uri, i) for i in range(8)])
    client = MlflowClient(tracking_uri=uri)
    for i, run_id in enumerate(run_ids):
        hist = client.get_metric_history(run_id, "val/score")
        assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
        assert sorted(round(m.value, 6) for m in hist) == [round(i + s / 100, 6) for s in range(1, STEPS + 1)]
    assert len(client.search_experiments(filter_string="name = 'concurrency'")) == 1


def test_parent_run_is_created_once_and_children_nest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "nesting")
    state = tmp_path / "tracking.json"
    a = tracker.parent_run("significance", {"phase": "significance"}, state)
    b = tracker.parent_run("significance", {"phase": "significance"}, state)
    assert a == b
    child = tracker.start_run("seed0", {"phase": "seed"}, parent_id=a)
    assert MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == a


def test_replay_sends_only_rows_not_yet_logged(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "replay")
    run_id = tracker.start_run("r", {})
    reporter = EpochReporter(tracker, run_id)
    rows = [{"step": s, "val/score": float(s)} for s in range(1, 6)]
    for row in rows[:3]:
        reporter.epoch(row["step"], row)
    reporter.flush()
    reporter.epoch(4, rows[3])  # buffered, not yet sent: replay must send it once, not twice
    reporter.replay(rows)
    steps = sorted(m.step for m in tracker.client.get_metric_history(run_id, "val/score"))
    assert steps == [1, 2, 3, 4, 5]


def test_rows_are_batched_until_flush_or_the_interval(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "batching")
    run_id = tracker.start_run("r", {})
    reporter = EpochReporter(tracker, run_id, flush_every=3600)
    for step in range(1, 4):
        reporter.epoch(step, {"val/score": float(step)})
    assert tracker.client.get_metric_history(run_id, "val/score") == []
    reporter.flush()
    assert sorted(m.step for m in tracker.client.get_metric_history(run_id, "val/score")) == [1, 2, 3]
    eager = EpochReporter(tracker, run_id, flush_every=0)
    eager.epoch(4, {"val/score": 4.0})
    assert len(tracker.client.get_metric_history(run_id, "val/score")) == 4
