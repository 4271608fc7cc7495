"""Weeks of running, compressed: 50 rounds of creating and deleting 100 runs and 10 registered models
under `run`. The connector's memory follows what exists, not what ever existed: its resident size after
the last round is within 10% of its size after the first.

Deleted runs stay in MLflow (a soft delete) until `mlflow gc` purges them, as an MLflow operator runs it;
it runs here every ten rounds, so that deleted runs really go, as deleted models do at once.

A memory target, so it runs as a benchmark does, on its own (`make soak`, about 5 minutes on a quiet
machine), not in `make test`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from connector.devstack.mlflow_server import MlflowServer, free_port
from tests.conftest import REPO, ConfigFactory
from tests.integration.test_operations import _metrics, _total

ROUNDS, RUNS, MODELS = 50, 100, 10
SETTLE_EVERY = 10


def _rss_bytes(pid: int) -> int:
    """Resident memory of the process and its children (the command may fork)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    return total


def _churn(client: MlflowClient, experiment: str, round_: int, pool: ThreadPoolExecutor) -> None:
    run_ids = list(pool.map(lambda n: client.create_run(experiment, run_name=f"r{round_}-{n}").info.run_id,
                            range(RUNS)))
    names = [f"soak model {round_}-{n}" for n in range(MODELS)]
    list(pool.map(client.create_registered_model, names))
    list(pool.map(client.delete_run, run_ids))
    list(pool.map(client.delete_registered_model, names))


@pytest.mark.soak
def test_memory_does_not_grow_with_churn(mlflow_factory: Callable[[], MlflowServer], make_config: ConfigFactory,
                                         tmp_path: Path) -> None:
    server = mlflow_factory()
    client = MlflowClient(server.uri, server.uri)
    experiment = client.create_experiment("soak")
    port = free_port()
    path, _ = make_config(server.uri, {"metrics": {"listen": f"127.0.0.1:{port}"},
                                       "producer": {"poll_interval_seconds": 0.5, "reconcile_interval_seconds": 15}})
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "connector.cli", "run", "-c", str(path)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)

    def settled() -> None:
        """Until the consumer has caught up: no new events for a while, nothing left to read."""
        last, quiet_since, deadline = -1.0, time.monotonic(), time.monotonic() + 120
        while True:
            assert process.poll() is None, f"connector exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no quiet moment in 120 s: {log.read_text()[-3000:]}"
            metrics = _metrics(base)
            consumed = _total(metrics, "mlflow_datahub_events_consumed_total")
            if consumed != last:
                last, quiet_since = consumed, time.monotonic()
            elif time.monotonic() - quiet_since > 2.0 and consumed > 0:
                return
            time.sleep(0.25)

    def purge() -> None:
        subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", f"sqlite:///{server.db}"],
                       check=True, capture_output=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": server.uri})

    try:
        with ThreadPoolExecutor(4) as pool:
            _churn(client, experiment, 0, pool)
            purge()
            settled()
            first = _rss_bytes(process.pid)
            for round_ in range(1, ROUNDS):
                _churn(client, experiment, round_, pool)
                if round_ % SETTLE_EVERY == SETTLE_EVERY - 1:
                    purge()
                    settled()
            last = _rss_bytes(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print(f"RSS after round 1: {first / 2**20:.1f} MiB, after round {ROUNDS}: {last / 2**20:.1f} MiB")
    assert last <= first * 1.10, f"RSS grew from {first / 2**20:.1f} MiB to {last / 2**20:.1f} MiB"
