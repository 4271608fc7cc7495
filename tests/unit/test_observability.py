"""Metrics, health, progress and log lines, without a running connector: the pieces are pure or
serve on loopback."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.observability.http import Heartbeats, OperationsServer, Readiness
from connector.observability.logs import JsonFormatter
from connector.observability.metrics import METRICS
from connector.observability.progress import SnapshotProgress
from connector.redaction import remember_secrets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_without_a_beat_for_too_long_is_stuck() -> None:
    clock = Clock()
    beats = Heartbeats(clock)
    beats.beat("producer")
    beats.beat("consumer")
    clock.now += 100
    beats.beat("consumer")
    assert beats.stuck(120) == {}
    clock.now += 30
    assert beats.stuck(120) == {"producer": 130.0}
    beats.forget("producer")  # a loop that ended is not stuck
    assert beats.stuck(120) == {}


def test_readiness_names_what_does_not_answer_and_sees_it_come_back() -> None:
    state = {"up": False}

    def registry() -> None:
        if not state["up"]:
            raise ConnectionError("Connection refused")

    readiness = Readiness({"Kafka": lambda: None, "schema registry": registry})
    assert set(readiness.failures) == {"Kafka", "schema registry"}  # not checked yet: not ready
    readiness.check_once()
    assert readiness.failures == {"schema registry": "Connection refused"}
    state["up"] = True
    readiness.check_once()
    assert readiness.failures == {}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_operations_endpoint_serves_metrics_livez_and_readyz() -> None:
    clock = Clock()
    beats = Heartbeats(clock)
    beats.beat("consumer")
    readiness = Readiness({"MLflow": lambda: None})
    server = OperationsServer(("127.0.0.1", 0), beats, readiness, stall_seconds=60).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        before = _value("mlflow_datahub_dead_letters_total")
        METRICS.consumed(2, {"status": 2}, 1, 0, 1, None)
        code, body = _get(base + "/metrics")
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert code == 200 and {"mlflow_datahub_build_info", "mlflow_datahub_mcps_written",
                                "mlflow_datahub_events_produced", "mlflow_datahub_source_lag_seconds"} <= families
        assert _value("mlflow_datahub_dead_letters_total") == before + 1
        assert _get(base + "/readyz")[0] == 503  # not checked yet
        readiness.check_once()
        assert _get(base + "/readyz") == (200, b'{"ready": true, "not_answering": {}}')
        assert _get(base + "/livez")[0] == 200
        clock.now += 61
        code, body = _get(base + "/livez")
        assert code == 503 and json.loads(body)["stuck"] == {"consumer": 61.0}
        assert _get(base + "/other")[0] == 404
    finally:
        server.stop()


def _value(name: str) -> float:
    value = METRICS.registry.get_sample_value(name)
    return value if value is not None else 0.0


def test_progress_counts_kinds_knows_totals_where_mlflow_tells_and_logs_every_10_s(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = SnapshotProgress("7-1", live=False, clock=clock)
    progress.total("EXPERIMENT", 2)
    caplog.set_level(logging.INFO)
    for _ in range(2):
        progress.advance("EXPERIMENT")
    assert progress.seconds_left() is not None  # every kind read so far has a total
    clock.now += 4
    for _ in range(30):
        progress.advance("RUN")
    assert progress.seconds_left() is None  # MLflow never tells how many runs there are
    assert "7-1" not in caplog.text  # not yet 10 s
    clock.now += 6
    progress.advance("RUN")
    assert "snapshot 7-1: 33 objects read (2/2 experiments, 31 runs) in 10 s, 3/s" in caplog.text
    assert METRICS.registry.get_sample_value("mlflow_datahub_snapshot_objects_read") == 33
    assert METRICS.registry.get_sample_value("mlflow_datahub_snapshot_running") == 1
    progress.close()
    assert METRICS.registry.get_sample_value("mlflow_datahub_snapshot_running") == 0


def test_json_log_lines_are_one_object_each_with_secrets_masked() -> None:
    remember_secrets(["json-secret-99"])
    record = logging.LogRecord("connector.producer", logging.WARNING, __file__, 1,
                               "MLflow at %s refused json-secret-99", ("http://u:pw@mlflow",), None)
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "connector.producer"
    assert data["message"] == "MLflow at http://***@mlflow refused ***" and "\n" not in line
