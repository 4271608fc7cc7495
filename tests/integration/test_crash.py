"""Crash test: during a snapshot of several hundred entities plus live changes, the producer and the
consumer are killed with SIGKILL at random moments (at least 20 times in all) and restarted. The MCP
topic, read committed, must then hold the complete and correct final state, the same as a clean run
of the same MLflow, and the test reports the number of duplicate MCPs (target 0)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from connector.config import ConnectorConfig
from connector.devstack.mlflow_server import MlflowServer
from connector.pipeline.dump import read_mcps
from tests.conftest import REPO, ConfigFactory, run_cli

KILLS = 24


def _fill(client: MlflowClient) -> None:
    """~430 entities: 3 experiments x 100 runs, 25 models x 5 versions."""
    experiments = [client.create_experiment(f"crash {i}") for i in range(3)]

    def one_run(args: tuple[str, int]) -> str:
        exp, i = args
        run_id = client.create_run(exp, run_name=f"run {i}").info.run_id
        client.log_batch(run_id, metrics=[Metric("loss", 1.0 / (i + 1), 0, 0)],
                         params=[Param("i", str(i))], tags=[RunTag("batch", "crash")])
        client.set_terminated(run_id)
        return run_id

    with ThreadPoolExecutor(6) as pool:
        run_ids = list(pool.map(one_run, [(e, i) for e in experiments for i in range(100)]))
    for m in range(25):
        client.create_registered_model(f"crash model {m}")
        for v in range(5):
            client.create_model_version(f"crash model {m}", f"runs:/{run_ids[m * 5 + v]}/m",
                                        run_id=run_ids[m * 5 + v])


def _live_changes(client: MlflowClient, stop: threading.Event, made: Counter) -> None:
    """Changes polling sees: new runs (some left running, then finished), new versions, stages."""
    exp = client.create_experiment("crash live")
    rng = random.Random(7)
    active: list[str] = []
    while not stop.is_set():
        choice = rng.random()
        if choice < 0.4 or not active:
            run_id = client.create_run(exp, run_name=f"live {made['runs']}").info.run_id
            client.log_metric(run_id, "accuracy", rng.random())
            active.append(run_id)
            made["runs"] += 1
        elif choice < 0.7:
            run_id = active.pop(0)
            client.log_metric(run_id, "accuracy", rng.random())
            client.set_terminated(run_id)
            made["finished"] += 1
        elif choice < 0.85:
            client.create_model_version(f"crash model {rng.randrange(25)}", "s3://bucket/live")
            made["versions"] += 1
        else:
            model = f"crash model {rng.randrange(25)}"
            version = rng.randrange(1, 6)
            client.transition_model_version_stage(model, str(version), rng.choice(["Staging", "Production"]))
            made["stages"] += 1
        stop.wait(0.3)
    for run_id in active:
        client.set_terminated(run_id)


class Process:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "connector.cli", *self.args], cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def final_state(cfg: ConnectorConfig) -> tuple[dict[tuple[str, str], str], Counter]:
    """Last value of each (URN, aspect) on the MCP topic, and per-(URN, aspect) repeats of an
    unchanged value (a duplicate MCP)."""
    last: dict[tuple[str, str], str] = {}
    duplicates: Counter = Counter()
    for urn, mcp in read_mcps(cfg):
        key = (urn, mcp.aspectName)
        value = json.dumps(json.loads(mcp.aspect.value), sort_keys=True)
        if last.get(key) == value:
            duplicates[key] += 1
        last[key] = value
    return last, duplicates


@dataclass
class Convergence:
    """A crashed pipeline's MCP topic against a clean run's of the same MLflow state."""

    actual: dict[tuple[str, str], str]
    duplicates: Counter  # repeats of an unchanged value beyond those of the clean run
    repeated: int

    def check(self, expected: dict[tuple[str, str], str]) -> None:
        extra = {k for k in self.actual if k not in expected}
        # Entities the clean run never saw can only be soft-deleted ones; everything it saw is identical.
        assert all(json.loads(self.actual[k]) == {"removed": True} or k[1] != "status" for k in extra)
        assert self.repeated <= 0, f"{self.repeated} duplicate MCPs: {self.duplicates.most_common(5)}"


def converge_to_clean_run(mlflow_uri: str, make_config: ConfigFactory, cfg: ConnectorConfig,
                          alive: Callable[[], bool], what: str, seconds: float = 150
                          ) -> tuple[Convergence, dict[tuple[str, str], str]]:
    """A clean snapshot of MLflow as it is now; then waits until `cfg`'s MCP topic holds the same last value
    of every (URN, aspect), while `alive()` (the crashed pipeline's processes still run)."""
    clean_path, clean_cfg = make_config(mlflow_uri, name="clean.yml")
    result = run_cli("snapshot", "-c", str(clean_path))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, clean_duplicates = final_state(clean_cfg)
    deadline = time.monotonic() + seconds
    while True:
        assert alive(), f"a restarted process died: {what}"
        actual, duplicates = final_state(cfg)
        missing = {k for k in expected if k not in actual}
        wrong = {k for k in expected if k in actual and actual[k] != expected[k]}
        if not missing and not wrong:
            repeated = sum(duplicates.values()) - sum(clean_duplicates.values())
            return Convergence(actual, duplicates, repeated), expected
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {len(missing)} (URN, aspect) missing, e.g. {sorted(missing)[:3]}; {len(wrong)} "
                        f"differ, e.g. {sorted(wrong)[:3]}")
        time.sleep(3)


@pytest.mark.slow
def test_sigkill_producer_and_consumer_during_snapshot_and_changes(
        own_mlflow: MlflowServer, make_config: ConfigFactory, tmp_path: Path) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    _fill(client)
    path, cfg = make_config(own_mlflow.uri, {
        "producer": {"poll_interval_seconds": 1, "reconcile_interval_seconds": 25, "transaction_size": 40,
                     "watermark_overlap_seconds": 2},
        "consumer": {"batch_size": 50},
    })
    producer = Process(["produce", "-c", str(path)], tmp_path / "producer.log")
    consumer = Process(["consume", "-c", str(path), "--instance-id", "crash-consumer"], tmp_path / "consumer.log")
    producer.start()
    consumer.start()

    stop_changes = threading.Event()
    made: Counter = Counter()
    changer = threading.Thread(target=_live_changes, args=(client, stop_changes, made), daemon=True)
    changer.start()
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261127")))
    kills: Counter = Counter()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 4.0))
            victim = rng.choice([producer, consumer])
            name = "producer" if victim is producer else "consumer"
            if victim.alive():
                victim.kill()
                kills[name] += 1
            victim.start()
        stop_changes.set()
        changer.join(60)
        assert kills["producer"] + kills["consumer"] >= 20, kills

        # A clean run of the same, final MLflow state. The crashed pipeline converges to it: incremental
        # cycles catch the last live changes, and a complete snapshot (every 25 s) any edit that moves no timestamp.
        outcome, expected = converge_to_clean_run(
            own_mlflow.uri, make_config, cfg, lambda: producer.alive() and consumer.alive(),
            f"after {sum(kills.values())} kills (logs in {tmp_path})")
    finally:
        stop_changes.set()
        for process in (producer, consumer):
            if process.alive():
                process.stop()

    repeated = outcome.repeated
    print(f"\ncrash test: {kills['producer']} producer and {kills['consumer']} consumer SIGKILLs, live changes "
          f"{dict(made)}; {len(outcome.actual)} (URN, aspect) pairs match a clean run; duplicate MCPs: "
          f"{max(repeated, 0)} (beyond those a clean run also writes: one per partition for shared URNs)")
    outcome.check(expected)
