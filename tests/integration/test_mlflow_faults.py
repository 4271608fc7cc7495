"""Every kind of bad answer MLflow (or what stands in front of it) can give, injected by a proxy on
loopback between the connector and a real `mlflow server`: HTTP 400, 404 and 500, an HTML page with
200 (an authenticating proxy's login page), an empty 200, a body cut off mid-way, and a connection
reset. For each: what the reader does (retried until the fault stops, or one clear error), what a
targeted read does (an object that keeps failing is skipped, named and counted), and that a running
producer survives each one and then publishes what changed meanwhile."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from connector.config import ConnectorConfig
from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.kafka.topics import ensure_topics
from connector.mlflow.listing import full_listing
from connector.mlflow.reader import (
    AuthenticationFailed,
    MlflowReader,
    MlflowUnavailable,
    ReaderSettings,
    RequestFailed,
    does_not_exist,
    http_status,
    reader_settings,
)
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka
from tests.integration.test_incremental import Topic

FAULTS = ("400", "404", "500", "html", "empty", "truncated", "reset")
LOGIN_PAGE = (b"<!DOCTYPE html>\n<html>\n<head><title>Sign in</title></head>\n<body>\n<form method=\"post\" "
              b"action=\"/oauth2/sign_in\"><input name=\"user\"><input name=\"password\" type=\"password\"></form>\n"
              b"</body>\n</html>\n")


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards to MLflow; requests whose path contains a fragment of `faults` get that fault instead."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", free_port()), FaultHandler)
        self.upstream = upstream
        self.faults: dict[str, str] = {}  # path fragment ("" for every path) -> fault
        self.injected: Counter[str] = Counter()  # fault -> how many requests got it
        self.forwarded = 0
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, fault: str | None, fragment: str = "") -> None:
        with self.lock:
            if fault is None:
                self.faults.pop(fragment, None)
            else:
                self.faults[fragment] = fault

    def fault_for(self, path: str) -> str | None:
        with self.lock:
            fault = next((f for fragment, f in self.faults.items() if fragment in path), None)
            if fault is not None:
                self.injected[fault] += 1
            else:
                self.forwarded += 1
            return fault


class FaultHandler(http.server.BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's client expects

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str = "application/json",
                length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client gets a TCP reset, not an orderly end."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _upstream(self, body: bytes | None) -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type",
                                                                                   "application/json")})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", "application/json"), response.read()
        except urllib.error.HTTPError as e:  # MLflow's own error answers pass through
            return e.code, e.headers.get("Content-Type", "application/json"), e.read()

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        fault = self.server.fault_for(self.path)
        if fault == "400":
            self._answer(400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                          "message": "injected: bad request"}).encode())
        elif fault == "404":
            self._answer(404, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST",
                                          "message": "injected: not found"}).encode())
        elif fault == "404 page":  # a proxy's own page for a path it does not route
            self._answer(404, b"<html><body><h1>404 Not Found</h1></body></html>\n", "text/html")
        elif fault == "500":
            self._answer(500, json.dumps({"error_code": "INTERNAL_ERROR", "message": "injected: server error"}
                                         ).encode())
        elif fault == "html":
            self._answer(200, LOGIN_PAGE, "text/html; charset=utf-8")
        elif fault == "empty":
            self._answer(200, b"")
        elif fault == "unreadable":  # JSON, but not what MLflow's client can read into its objects
            self._answer(200, json.dumps({"experiments": "?", "registered_models": "?", "model_versions": "?",
                                          "runs": "?"}).encode())
        elif fault == "truncated":  # MLflow's real answer, the connection closed after half of it
            status, content_type, payload = self._upstream(body)
            self._answer(status, payload[:len(payload) // 2], content_type, length=len(payload))
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
        elif fault == "reset":
            self._reset()
        else:
            status, content_type, payload = self._upstream(body)
            self._answer(status, payload, content_type)

    do_GET = do_POST = _handle


@pytest.fixture
def fault_proxy(demo_mlflow: MlflowServer) -> Iterator[FaultProxy]:
    yield from _serve(FaultProxy(demo_mlflow.uri))


def _serve(server: FaultProxy) -> Iterator[FaultProxy]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own HTTP retries off: the reader's retries, with their log lines, are what is seen."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _quick_reader(uri: str, retry_for_seconds: float | None = None) -> MlflowReader:
    return MlflowReader(ReaderSettings(uri, uri, retry_initial_seconds=0.2, retry_max_seconds=0.5,
                                       retry_for_seconds=retry_for_seconds))


def _lift_after(proxy: FaultProxy, seconds: float, fragment: str = "") -> threading.Timer:
    timer = threading.Timer(seconds, proxy.inject, (None, fragment))
    timer.start()
    return timer


RETRIED = {  # fault -> what the reader's retry line says MLflow did
    "500": "answered HTTP 5xx, 408 or 429 to every attempt of its client",
    "html": "answered an HTML page where JSON was expected (a login page of a proxy in front of MLflow?)",
    "empty": "answered an empty body where JSON was expected",
    "truncated": "answered a body that was cut off",
    "reset": "is unreachable (connection reset)",
}


# -- the reader, fault by fault ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(RETRIED))
def test_a_fault_without_a_useful_answer_is_retried_until_it_stops(
        fault: str, fault_proxy: FaultProxy, no_client_retries: None, caplog: pytest.LogCaptureFixture) -> None:
    reader = _quick_reader(fault_proxy.uri, retry_for_seconds=1.0)
    expected = sorted(e.name for page in reader.experiments() for e in page)

    # While it lasts: retried with one clear line each time, then MlflowUnavailable (never an empty page).
    fault_proxy.inject(fault, "experiments/search")
    with caplog.at_level(logging.WARNING, "connector"), pytest.raises(MlflowUnavailable) as error:
        list(reader.experiments())
    assert not isinstance(error.value, RequestFailed)
    assert "did not answer search_experiments" in str(error.value) and RETRIED[fault] in str(error.value)
    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert len(retries) >= 2 and all(RETRIED[fault] in line and "\n" not in line for line in retries), retries
    assert all(r.exc_info is None for r in caplog.records), "expected conditions log without stack traces"

    # Once it stops: the same listing, complete.
    fault_proxy.injected.clear()
    reader = _quick_reader(fault_proxy.uri)  # retries until MLflow answers, as `produce` does
    timer = _lift_after(fault_proxy, 1.5, "experiments/search")
    started = time.monotonic()
    assert sorted(e.name for page in reader.experiments() for e in page) == expected
    timer.join()
    assert time.monotonic() - started >= 1.4 and fault_proxy.injected[fault] >= 2


def test_an_error_that_retrying_cannot_change_is_raised_at_once(fault_proxy: FaultProxy,
                                                                no_client_retries: None) -> None:
    reader = _quick_reader(fault_proxy.uri)  # would retry a transient failure for ever
    fault_proxy.inject("400", "runs/search")
    with pytest.raises(RequestFailed) as error:
        reader.runs(["0"]).__next__()
    # A kind of MlflowUnavailable (a listing that meets it is incomplete), with MLflow's status.
    assert isinstance(error.value, MlflowUnavailable) and isinstance(error.value, MlflowException)
    assert http_status(error.value) == 400
    assert str(error.value) == (f"MLflow at {fault_proxy.uri} answered HTTP 400 (INVALID_PARAMETER_VALUE: injected: "
                                "bad request) for search_runs")
    assert fault_proxy.injected["400"] == 1  # not retried

    # JSON that MLflow's client cannot read into its objects: the same, without a status.
    fault_proxy.inject("unreadable", "runs/search")
    with pytest.raises(RequestFailed, match=r"answered what its client cannot read \(ParseError: .*\) for "
                                            r"search_runs$") as error:
        reader.runs(["0"]).__next__()
    assert http_status(error.value) is None and fault_proxy.injected["unreadable"] == 1

    # 404 is MLflow's own answer ("no such object", or an API the server lacks): raised as is, at once.
    fault_proxy.inject("404", "runs/search")
    with pytest.raises(MlflowException) as error:
        reader.runs(["0"]).__next__()
    assert not isinstance(error.value, (MlflowUnavailable, AuthenticationFailed))
    assert http_status(error.value) == 404 and fault_proxy.injected["404"] == 1
    # ... and only MLflow's own 404 (RESOURCE_DOES_NOT_EXIST) says that an object is gone.
    assert does_not_exist(error.value)
    with pytest.raises(MlflowException) as error:
        reader.call("get_experiment", reader.tracking.get_experiment, "987654321")
    assert does_not_exist(error.value)
    fault_proxy.inject("404 page", "experiments/get")
    with pytest.raises(MlflowException) as error:
        reader.call("get_experiment", reader.tracking.get_experiment, "0")
    assert http_status(error.value) == 404 and not does_not_exist(error.value)


@pytest.mark.parametrize("fault", ["400", "empty", "html", "unreadable"])
def test_a_fault_in_one_search_leaves_the_listing_incomplete(fault: str, fault_proxy: FaultProxy,
                                                             no_client_retries: None) -> None:
    """An empty 200 read as an empty page would make everything look deleted: never taken as an answer."""
    fault_proxy.inject(fault, "model-versions/search")
    with pytest.raises(MlflowUnavailable):
        list(full_listing(_quick_reader(fault_proxy.uri, retry_for_seconds=1.0)))


def test_other_mlflow_clients_keep_mlflow_s_own_answer_check(fault_proxy: FaultProxy,
                                                             no_client_retries: None) -> None:
    """The stricter check applies within the reader's requests only."""
    fault_proxy.inject("empty", "experiments/search")
    assert MlflowClient(fault_proxy.uri).search_experiments() == []  # MLflow's own reading of an empty 200


# -- the producer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_mlflow(mlflow_factory: Callable[[], MlflowServer]) -> Iterator[FaultProxy]:
    """A server of this module's own, behind a fault proxy."""
    yield from _serve(FaultProxy(mlflow_factory().uri))


def _producer(cfg: ConnectorConfig, proxy: FaultProxy) -> ChangeProducer:
    ensure_topics(cfg)
    settings = reader_settings(cfg)  # as `produce`: retried until MLflow answers
    quick = ReaderSettings(settings.tracking_uri, settings.registry_uri, retry_initial_seconds=0.2,
                           retry_max_seconds=1.0)
    return ChangeProducer(cfg, MlflowReader(quick))


class Running:
    """`ChangeProducer.run` in a thread; `error` holds what ended it, if anything did."""

    def __init__(self, producer: ChangeProducer) -> None:
        self.producer, self.stop, self.error = producer, threading.Event(), None
        self.thread = threading.Thread(target=self._run, name="producer-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.producer.run(self.stop)
        except BaseException as e:  # surfaced by the test
            self.error = e

    def alive(self) -> bool:
        assert self.error is None, f"the producer ended: {self.error!r}"
        assert self.thread.is_alive(), "the producer ended"
        return True

    def end(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and self.error is None, self.error
        self.producer.close()


def _wait(what: str, condition: Callable[[], bool], seconds: float, running: Running) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        running.alive()
        assert time.monotonic() < deadline, f"gave up waiting {seconds:.0f} s for {what}"
        time.sleep(0.3)


def test_a_running_producer_survives_every_fault_and_publishes_what_changed_meanwhile(
        faulty_mlflow: FaultProxy, make_config: ConfigFactory, kafka: Kafka, no_client_retries: None,
        caplog: pytest.LogCaptureFixture) -> None:
    upstream = MlflowClient(faulty_mlflow.upstream)  # changes made directly in MLflow
    experiment = upstream.create_experiment("faults")
    _, cfg = make_config(faulty_mlflow.uri, {"producer": {"poll_interval_seconds": 0.5,
                                                          "watermark_overlap_seconds": 1}})
    topic = Topic(kafka, cfg)
    running = Running(_producer(cfg, faulty_mlflow))
    try:
        _wait("the first snapshot", lambda: running.producer.position.last_snapshot_ms is not None, 60, running)
        for fault in FAULTS:
            faulty_mlflow.injected.clear()
            with caplog.at_level(logging.WARNING, "connector"):
                caplog.clear()
                faulty_mlflow.inject(fault)  # every request
                run_id = upstream.create_run(experiment, run_name=f"during {fault}").info.run_id
                time.sleep(2.5)
                faulty_mlflow.inject(None)
                running.alive()
                assert faulty_mlflow.injected[fault] >= 1, fault
                _wait(f"the run made during {fault}",
                      lambda run_id=run_id: any(e["key"] == f"run:{run_id}" for e in topic.all()), 60, running)
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert lines and all("\n" not in line and "Traceback" not in line for line in lines), lines
            assert all(r.exc_info is None for r in caplog.records)
            if fault in RETRIED:  # retried request by request (`produce` waits for MLflow to answer)
                assert any(RETRIED[fault] in line for line in lines), lines
            else:  # the cycle fails at once: one line, a backoff, the cycle again
                assert any(line.startswith("producer: cycle failed") and f"HTTP {fault}" in line
                           for line in lines), lines
        assert running.producer.skipped_objects == 0
    finally:
        faulty_mlflow.inject(None)
        running.end()


def test_a_targeted_read_that_keeps_failing_is_skipped_named_and_counted(
        faulty_mlflow: FaultProxy, make_config: ConfigFactory, kafka: Kafka, no_client_retries: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from connector.pipeline import producer as producer_module

    monkeypatch.setattr(producer_module, "TARGETED_READ_RETRY_SECONDS", 1.0)
    monkeypatch.setattr(producer_module, "CYCLE_RETRY_SECONDS", 1.0)  # cycles meet the faults too
    upstream = MlflowClient(faulty_mlflow.upstream)
    names = {"fine": None, "refused-with-400": "400", "failing-with-500": "500", "unreadable-answer": "unreadable"}
    for name in names:
        upstream.create_registered_model(name)
    _, cfg = make_config(faulty_mlflow.uri, {"producer": {"poll_interval_seconds": 0.5}})
    topic = Topic(kafka, cfg)
    running = Running(_producer(cfg, faulty_mlflow))
    try:
        _wait("the first snapshot", lambda: running.producer.position.last_snapshot_ms is not None, 60, running)
        topic.new()
        for name, fault in names.items():
            upstream.set_registered_model_tag(name, "changed", "yes")
            if fault:
                faulty_mlflow.inject(fault, name)  # the model's name is in its searches' query strings
        with caplog.at_level(logging.WARNING, "connector.producer"):
            for name in names:  # as a webhook delivery does
                running.producer.refresh_requests.put(name)
            _wait("three skipped models", lambda: running.producer.skipped_objects >= 3, 60, running)
            _wait("the fine model's change", lambda: ("UPDATE", "registered_model:fine") in topic.new(), 30, running)
        skipped = [r.getMessage() for r in caplog.records if "skipped registered model" in r.getMessage()]
        assert sorted(line.split("'")[1] for line in skipped) == sorted(n for n, f in names.items() if f), skipped
        assert all("failed 3 times while MLflow answered other requests" in line for line in skipped), skipped
        assert running.producer.skipped_objects == 3
    finally:
        for name in names:
            faulty_mlflow.inject(None, name)
        running.end()
