"""MLflow tracking, on a SQLite file and through a real `mlflow server`: parallel writers lose nothing,
parents are shared, artifacts land, transient HTTP errors are retried and an unreachable server is named."""
import http.server
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tunewise.tracking import EpochReporter, Tracker, TrackingError

STEPS = 25
WRITERS = 16


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    # MLFLOW_TRACKING_URI wins over the URI a Tracker is given: a user's would redirect these tests
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn workers: the whole process group it leads."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real tracking server for the module (it takes several seconds to start), bound to 127.0.0.1,
    SQLite behind it, artifacts proxied into a folder of its own."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner (GenAI jobs) is 8 more processes
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'srv.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "2"]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(uri):
            assert proc.poll() is None, f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not healthy: {(root / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)
        yield SimpleNamespace(uri=uri, artifacts=root / "artifacts")
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("mlflow_server").uri


def _writer(uri: str, experiment: str, i: int, start, results) -> None:
    tracker = Tracker(uri, experiment)
    start.wait()  # every writer's first write at the same moment
    run_id = tracker.start_run(f"w{i}", {"phase": "seed"})
    reporter = EpochReporter(tracker, run_id)
    for step in range(1, STEPS + 1):
        reporter.epoch(step, {"val/score": i + step / 100, "train/loss": 1.0 / step, "step": step})
        if step % 5 == 0:
            reporter.flush()  # several transactions per writer, interleaved with the other writers
    reporter.flush()
    tracker.end_run(run_id)
    results.put((i, run_id))


def test_parallel_writers_lose_no_metric(store, request):
    # forkserver with mlflow preloaded: 16 real processes without 16 imports of mlflow on a small machine
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
                                "mlflow.store.tracking.rest_store", "tunewise.tracking"])
    experiment = f"concurrency-{request.node.callspec.id}"
    start, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(store, experiment, i, start, results)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    run_ids = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    client = MlflowClient(tracking_uri=store)
    assert len(client.search_experiments(filter_string=f"name = '{experiment}'")) == 1
    for i, run_id in sorted(run_ids.items()):
        assert client.get_run(run_id).info.status == "FINISHED"
        score = client.get_metric_history(run_id, "val/score")
        assert sorted((m.step, round(m.value, 6)) for m in score) == [(s, round(i + s / 100, 6)) for s in range(1, STEPS + 1)]
        loss = client.get_metric_history(run_id, "train/loss")
        assert sorted((m.step, round(m.value, 6)) for m in loss) == [(s, round(1.0 / s, 6)) for s in range(1, STEPS + 1)]
    assert len(run_ids) == WRITERS


def test_parent_run_is_created_once_and_children_nest(store, tmp_path):
    tracker = Tracker(store, f"nesting-{tmp_path.name}")
    state = tmp_path / "tracking.json"
    a = tracker.parent_run("significance", {"phase": "significance"}, state)
    b = tracker.parent_run("significance", {"phase": "significance"}, state)
    assert a == b
    child = tracker.start_run("seed0", {"phase": "seed"}, parent_id=a)
    assert MlflowClient(store).get_run(child).data.tags["mlflow.parentRunId"] == a
    children = MlflowClient(store).search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{a}'")
    assert [r.info.run_id for r in children] == [child]


def test_replay_sends_only_rows_not_yet_logged(store, tmp_path):
    tracker = Tracker(store, f"replay-{tmp_path.name}")
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


def test_artifacts_are_uploaded_through_the_server(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server.uri, "artifacts")
    run_id = tracker.start_run("r", {})
    report = tmp_path / "diagnostic_report.md"
    report.write_text("# findings\n")
    tracker.log_artifact(run_id, report, "reports")
    tracker.end_run(run_id)
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment(tracker.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/diagnostic_report.md"]
    fetched = client.download_artifacts(run_id, "reports/diagnostic_report.md", str(tmp_path / "back"))
    assert Path(fetched).read_text() == "# findings\n"
    # stored by the server in its --artifacts-destination, not written by the client beside it
    assert [p.read_text() for p in mlflow_server.artifacts.rglob("diagnostic_report.md")] == ["# findings\n"]


def _proxy(upstream: str, port: int, fail_first: int) -> tuple[http.server.ThreadingHTTPServer, dict]:
    """A stand-in for a struggling server: answers 503 to the first `fail_first` requests, then relays
    to the real one."""
    seen = {"requests": 0}

    class Relay(http.server.BaseHTTPRequestHandler):
        def _relay(self):
            seen["requests"] += 1
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if seen["requests"] <= fail_first:
                status, data, ctype = 503, b"", "text/plain"
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                req = urllib.request.Request(upstream + self.path, data=body or None, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def no_mlflow_http_retries(monkeypatch):
    # MLflow's HTTP client retries 5xx and refused connections itself (7 times, minutes in all); switched off,
    # what rides them out here is the Tracker's own retry
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_5xx_answers_are_retried(mlflow_server, no_mlflow_http_retries, monkeypatch):
    monkeypatch.setenv("TUNEWISE_TRACKING_RETRY_S", "60")
    proxy, seen = _proxy(mlflow_server.uri, _free_port(), fail_first=3)
    try:
        uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        tracker = Tracker(uri, "flaky")
        run_id = tracker.start_run("r", {})
        tracker.log_metrics(run_id, {"val/score": 0.5}, step=1)
    finally:
        proxy.shutdown()
    assert seen["requests"] > 3
    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id, "val/score")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_a_server_that_is_still_starting_is_waited_for(mlflow_server, no_mlflow_http_retries, monkeypatch):
    monkeypatch.setenv("TUNEWISE_TRACKING_RETRY_S", "60")
    port = _free_port()
    started = {}
    # connections are refused until the "server" comes up 1.5 s later
    timer = threading.Timer(1.5, lambda: started.update(proxy=_proxy(mlflow_server.uri, port, fail_first=0)[0]))
    timer.start()
    t0 = time.monotonic()
    try:
        tracker = Tracker(f"http://127.0.0.1:{port}", "late-server")
        run_id = tracker.start_run("r", {})
    finally:
        timer.join()
        started["proxy"].shutdown()
    assert time.monotonic() - t0 >= 1.4
    assert MlflowClient(mlflow_server.uri).get_run(run_id).info.experiment_id == tracker.experiment_id


def test_an_unreachable_server_fails_with_its_uri(no_mlflow_http_retries, monkeypatch):
    monkeypatch.setenv("TUNEWISE_TRACKING_RETRY_S", "1.5")
    uri = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        Tracker(uri, "nowhere")
    assert 1.5 <= time.monotonic() - t0 < 15
    message = str(e.value)
    assert f"MLflow tracking store {uri} still failing" in message
    assert "is `mlflow server` running" in message and "Connection refused" in message


def test_a_real_error_is_not_retried(mlflow_server, no_mlflow_http_retries, monkeypatch):
    monkeypatch.setenv("TUNEWISE_TRACKING_RETRY_S", "60")
    tracker = Tracker(mlflow_server.uri, "no-retry")
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        tracker.set_tags("0" * 32, {"a": 1})  # no such run: the server's answer is final
    assert not isinstance(e.value, TrackingError)
    assert time.monotonic() - t0 < 10
