"""Operating the connector: a running `run` scraped over HTTP (/metrics values move, /readyz follows
MLflow going away and coming back while the process keeps running, /livez stays live), and `status`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from connector.devstack.mlflow_server import MlflowServer, free_port
from tests.conftest import REPO, ConfigFactory, run_cli


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = _get(base + "/metrics")
    if code != 200:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _total(metrics: dict, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def _runs_produced(metrics: dict) -> float:
    return sum(v for (n, labels), v in metrics.items()
               if n == "mlflow_datahub_events_produced_total" and ("entity_type", "run") in labels)


def _caught_up(metrics: dict) -> bool:
    """Every change event the producer wrote has been consumed (both counters are this process's)."""
    produced = _total(metrics, "mlflow_datahub_events_produced_total")
    return produced > 0 and metrics.get(("mlflow_datahub_events_consumed_total", ()), -1) == produced


def _start_run(config: Path, log: Path) -> subprocess.Popen:
    """`mlflow-datahub run` as a process of its own, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "connector.cli", "run", "-c", str(config)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait(what: str, condition: Callable[[], bool], seconds: float, process: subprocess.Popen, log: Path) -> float:
    started = time.monotonic()
    while not condition():
        assert process.poll() is None, f"connector exited: {log.read_text()[-3000:]}"
        assert time.monotonic() - started < seconds, f"{what} not seen in {seconds:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_running_connector_is_scraped_probed_and_reported(mlflow_factory: Callable[[], MlflowServer],
                                                             make_config: ConfigFactory, tmp_path: Path) -> None:
    server = mlflow_factory()
    client = MlflowClient(server.uri, server.uri)
    experiment = client.create_experiment("operations")
    client.create_run(experiment, run_name="before")
    port = free_port()
    path, cfg = make_config(server.uri, {"metrics": {"listen": f"127.0.0.1:{port}", "check_interval_seconds": 2}})

    unhealthy = run_cli("status", "-c", str(path), "--json")
    assert unhealthy.returncode == 1, unhealthy.stderr
    assert "no complete snapshot yet" in json.loads(unhealthy.stdout)["problems"]

    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    process = _start_run(path, log)
    try:
        _wait("the first snapshot's MCPs", lambda: _total(_metrics(base), "mlflow_datahub_mcps_written_total") > 0,
              120, process, log)
        first = _metrics(base)
        assert first[("mlflow_datahub_build_info", (("version", "0.1.0"),))] == 1
        assert _total(first, "mlflow_datahub_events_produced_total") >= 3  # markers, experiments, the run
        assert first[("mlflow_datahub_last_complete_snapshot_timestamp_seconds", ())] > 0
        assert first[("mlflow_datahub_mlflow_requests_total", (("outcome", "ok"),))] > 0
        assert _get(base + "/livez")[0] == 200
        _wait("ready", lambda: _get(base + "/readyz")[0] == 200, 30, process, log)

        # A change in MLflow moves the counters, and the source lag is measured.
        runs_before = _runs_produced(_metrics(base))
        client.create_run(experiment, run_name="after")
        _wait("the new run produced and consumed",
              lambda: _runs_produced(m := _metrics(base)) > runs_before and _caught_up(m), 60, process, log)
        assert _metrics(base)[("mlflow_datahub_source_lag_seconds", ())] >= 0

        # MLflow goes away: not ready within 60 s, still live, still running; back: ready again.
        server.stop()
        went = _wait("not ready", lambda: _get(base + "/readyz")[0] == 503, 60, process, log)
        code, body = _get(base + "/readyz")
        assert code == 503 and "MLflow" in json.loads(body)["not_answering"], body
        assert _get(base + "/livez")[0] == 200 and process.poll() is None
        server.start()
        _wait("ready again", lambda: _get(base + "/readyz")[0] == 200, 60, process, log)
        print(f"readyz turned 503 {went:.1f} s after MLflow stopped")
        # Whatever the producer wrote around the outage is consumed before the stop, so that the status
        # of the stopped connector has no lag to report.
        _wait("caught up", lambda: _caught_up(_metrics(base)), 60, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    result = run_cli("status", "-c", str(path), "--json")
    status = json.loads(result.stdout)
    assert {"consumer_lag", "last_complete_snapshot", "entities_known", "dead_letters", "healthy"} <= set(status)
    assert result.returncode == 0 and status["healthy"] is True, result.stdout + result.stderr
    assert status["consumer_lag"]["total"] == 0 and status["entities_known"] >= 4
    assert status["last_complete_snapshot"]["complete"] is True
    assert status["dead_letters"] == 0
    text = run_cli("status", "-c", str(path))
    assert text.returncode == 0 and text.stdout.startswith("healthy: yes"), text.stdout


def test_a_stop_during_an_mlflow_outage_ends_run_promptly(mlflow_factory: Callable[[], MlflowServer],
                                                          make_config: ConfigFactory, tmp_path: Path) -> None:
    """`run` retries MLflow for as long as it is down; SIGTERM (a deployment rolling) still ends it at once,
    not when MLflow comes back, and with exit 0: nothing is lost, the next start goes on from Kafka."""
    server = mlflow_factory()
    client = MlflowClient(server.uri, server.uri)
    client.create_run(client.create_experiment("stop in an outage"), run_name="r")
    port = free_port()
    path, _ = make_config(server.uri, {"metrics": {"listen": f"127.0.0.1:{port}", "check_interval_seconds": 2}})
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    process = _start_run(path, log)
    try:
        _wait("the first snapshot consumed", lambda: _caught_up(_metrics(base)), 120, process, log)
        server.stop()
        _wait("the producer waiting on MLflow", lambda: "retry 2 in" in log.read_text(), 60, process, log)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        server.start()
    assert code == 0, log.read_text()[-3000:]
    assert took < 10, f"run took {took:.1f} s to stop during an outage"
    assert "Traceback" not in log.read_text()
