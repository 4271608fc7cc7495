"""What every part of the bench shares: its output, the machine it runs on, Kafka's endpoints, the
counting of MLflow requests, and `Bench`: the MLflow server, the connector configurations each part
runs with, the connector's Kafka connection for the bench's own clients, and the results."""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.processes import Child, log_time, tail, tree_cpu_seconds
from bench.proxy import LatencyProxy
from bench.scale_fixture import CACHE, REPO, BenchServer, Shape
from connector.devstack.mlflow_server import free_port

if TYPE_CHECKING:
    from connector.kafka.clients import KafkaConnection


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "connector", "schemas"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit += " (connector/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {"commit": commit,
        "nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "memory_gb": round(mem_gb, 1),
        "cpu_model": cpu, "python": platform.python_version(), "kernel": platform.release(),
        "mlflow": version("mlflow"), "acryl_datahub": version("acryl-datahub"),
        "confluent_kafka": version("confluent-kafka"),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the bench ------------------------------------------------------------------------------------


PRIVATE_STACK = CACHE / "stack"
PRIVATE_PORTS = ("MLFLOW_DATAHUB_KAFKA_PORT", "MLFLOW_DATAHUB_CONTROLLER_PORT", "MLFLOW_DATAHUB_REGISTRY_PORT",
                 "MLFLOW_DATAHUB_MLFLOW_PORT")


def kafka_endpoints(private: bool) -> tuple[str, str]:
    """The environment's Kafka and registry, else the local stack; `private`: a stack of the bench's
    own in .cache/bench/stack on other ports (Kafka restarts by concurrent test runs cannot reach it)."""
    from connector.devstack import stack

    if private:
        if not any(s.running for s in stack.status(root=PRIVATE_STACK)):
            # A fresh stack on free ports each time (its Kafka log is formatted for its ports).
            shutil.rmtree(PRIVATE_STACK, ignore_errors=True)
            ports: set[int] = set()
            while len(ports) < len(PRIVATE_PORTS):
                ports.add(free_port())
            os.environ.update({var: str(port) for var, port in zip(PRIVATE_PORTS, sorted(ports), strict=True)})
        endpoints = stack.up(root=PRIVATE_STACK, progress=lambda m: None if "not on the configured" in m else say(m))
        return endpoints.kafka_bootstrap_servers, endpoints.schema_registry_url
    bootstrap, registry = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("SCHEMA_REGISTRY_URL")
    if bootstrap and registry:
        return bootstrap, registry
    endpoints = stack.up(progress=say)
    return endpoints.kafka_bootstrap_servers, endpoints.schema_registry_url


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def endpoint_counts(requests: list[tuple[float, str]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for _, line in requests:
        m = re.search(r'"(GET|POST|PATCH|DELETE|PUT) ([^ ?"]+)', line)
        if m:
            path = m.group(2).removeprefix("/api/2.0/mlflow/").removeprefix("/ajax-api/2.0/mlflow/")
            counts[f"{m.group(1)} {path}"] += 1
    return dict(counts.most_common())


@dataclass
class Bench:
    args: argparse.Namespace
    shape: Shape
    server: BenchServer
    bootstrap: str
    registry: str
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)
    # --latency-ms: the proxy that delays each request, in front of the server for (a), (b) and (c).
    proxy: LatencyProxy | None = None
    # The proxy that stamps requests for start-up and restart (the latency proxy when there is one,
    # else one that delays nothing).
    stamp: LatencyProxy | None = None

    @property
    def uri(self) -> str:
        """MLflow as (a), (b) and (c) read it: through the latency proxy with --latency-ms, else directly."""
        return self.proxy.uri if self.proxy is not None else self.server.uri

    @property
    def latency_ms(self) -> float:
        return self.proxy.latency_ms if self.proxy is not None else 0.0

    def stamped_uri(self) -> str:
        """MLflow through a proxy that stamps each request's arrival (started when first needed)."""
        if self.stamp is None:
            self.stamp = LatencyProxy(self.server.uri, 0.0, self.workdir / "stamp-requests.log")
        return self.stamp.uri

    @functools.cached_property
    def connection(self) -> KafkaConnection:
        """The connector's own Kafka edge (connector.kafka.clients) to the bench's Kafka and registry:
        the bench's admin client, lag probes, MCP topic reader and schema-registry client."""
        from connector.config import KafkaConfig
        from connector.kafka.clients import KafkaConnection

        return KafkaConnection(KafkaConfig(bootstrap_servers=self.bootstrap, schema_registry_url=self.registry))

    @staticmethod
    def machine_busy_seconds() -> float:
        """CPU time the whole machine has been busy so far, all cores and processes together (`/proc/stat`:
        everything but idle and I/O wait). Over a round, against cores x wall time: how much of the
        machine the round left unused (the broker and the registry included)."""
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def stack_cpu_seconds(self) -> float | None:
        """CPU time the broker's and the registry's processes have used so far, when they are the bench's
        own (--private-stack); None for a stack that is not the bench's to look at."""
        if not self.args.private_stack:
            return None
        from connector.devstack import stack

        return sum(tree_cpu_seconds(s.pid) for s in stack.status(root=PRIVATE_STACK)
                   if s.pid and s.name in ("kafka", "schema-registry"))

    def server_cpu_seconds(self) -> float:
        """CPU time the MLflow server's processes have used so far."""
        return tree_cpu_seconds(self.server.process.pid)  # type: ignore[union-attr]

    def requests(self, start: float, end: float) -> list[tuple[float, str]]:
        assert self.server.access is not None
        return self.server.access.between(start, end)

    def config(self, name: str, poll: float | None = None, extra: dict[str, Any] | None = None,
               uri: str | None = None) -> tuple[Path, dict[str, Any]]:
        """A connector configuration with topics, group and transactional ids of its own, reading MLflow
        at `uri` (default: as (a), (b) and (c) do, `Bench.uri`)."""
        prefix = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self.prefixes.append(prefix)
        data: dict[str, Any] = {
            "source": {"type": "mlflow", "config": {"tracking_uri": uri or self.uri,
                                                    "stateful_ingestion": {"enabled": True}}},
            "kafka": {
                "bootstrap_servers": self.bootstrap, "schema_registry_url": self.registry, "partitions": 3,
                "consumer_group": f"{prefix}-group", "transactional_id_prefix": prefix,
                "topics": {"changes": f"{prefix}.changes", "state": f"{prefix}.state",
                           "producer_offsets": f"{prefix}.producer-offsets", "dead_letter": f"{prefix}.dlq",
                           "mcp": f"{prefix}.mcp"},
            },
            "producer": {"poll_interval_seconds": poll or self.args.poll_interval,
                         "reconcile_interval_seconds": 86400},
        }
        for key, value in (extra or {}).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) \
                else value
        path = self.workdir / f"{name}.yml"
        path.write_text(yaml.safe_dump(data))
        return path, data

    def record(self, part: str, figures: dict[str, Any]) -> None:
        self.results[part] = {**figures, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load_average()}

    def delete_topics(self) -> None:
        client = self.connection.admin()
        topics = [t for t in client.list_topics(timeout=10).topics if t.startswith(tuple(self.prefixes))]
        if topics:
            for future in client.delete_topics(topics, operation_timeout=30).values():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - best effort
                    pass


def caught_up(connection: KafkaConnection, topic: str, group: str) -> bool:
    """Has `group` consumed the whole of `topic`? The connector's own lag probe
    (connector.kafka.reading.consumer_lag): nothing readable left after the group's commits."""
    from confluent_kafka import KafkaException

    from connector.kafka.reading import consumer_lag

    try:
        lag = consumer_lag(connection, topic, group)
    except KafkaException:  # the broker is restarting, or the topic is not there yet: not yet
        return False
    return bool(lag) and not any(lag.values())


def wait_snapshot_consumed(connection: KafkaConnection, child: Child, data: dict[str, Any], timeout: float) -> float:
    """Wait until the child's first snapshot is published and consumed, and the features pass after it (the
    signatures it met unread) too; returns when (epoch)."""
    deadline = time.monotonic() + timeout
    k = data["kafka"]
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.proc.args[3]} exited early:\n{tail(child.stderr())}")
        log = child.stderr()
        features_due = log_time(log, r"snapshot \S+ complete: .*signatures to read after it") is not None
        if log_time(log, r"snapshot \S+ complete") is not None and \
                (not features_due or log_time(log, r"features: \d+ model versions read in") is not None) and \
                caught_up(connection, k["topics"]["changes"], k["consumer_group"]):
            return time.time()
        time.sleep(0.5)
    raise TimeoutError(f"first snapshot not consumed in {timeout:.0f} s:\n{tail(child.stderr())}")
