"""(d) Freshness of `mlflow-datahub run`: MLflow write -> its MCP read from the MCP topic, p50/p95,
for a registry change (through webhooks when the connector has them, else polling) and a new run."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.common import Bench, percentile, say, wait_snapshot_consumed
from bench.processes import Child, connector_cli, tail
from bench.scale_fixture import EXPERIMENT_PREFIX, MODEL_PREFIX, REPO
from connector.devstack.mlflow_server import free_port

if TYPE_CHECKING:
    from connector.kafka.clients import KafkaConnection


class McpTracker:
    """Reads the MCP topic from its current end and stamps each arrival of the watched aspects."""

    def __init__(self, connection: KafkaConnection, topic: str, aspects: set[str]) -> None:
        from confluent_kafka import OFFSET_END, TopicPartition

        from connector.kafka.mcp_serde import McpDeserializer
        from connector.kafka.reading import partitions_of

        self.aspects = aspects
        self.arrivals: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._decode = McpDeserializer(connection.schema_registry(), topic)
        self.consumer = connection.reader("bench MCP tracker", f"bench-tracker-{uuid.uuid4().hex}",
                                          {"isolation.level": "read_committed"})
        partitions = partitions_of(self.consumer, topic, timeout=10)
        self.parts = [TopicPartition(topic, p, OFFSET_END) for p in partitions]
        self.consumer.assign(self.parts)
        deadline = time.monotonic() + 30
        while any(tp.offset < 0 for tp in self.consumer.position(self.parts)) and time.monotonic() < deadline:
            self.consumer.consume(100, timeout=0.2)
        self._thread = threading.Thread(target=self._loop, name="mcp-tracker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(500, timeout=0.05):
                now = time.time()
                if msg.error() or msg.value() is None:
                    continue
                mcp = self._decode(msg.value())
                if mcp.aspectName not in self.aspects or mcp.aspect is None:
                    continue
                value = mcp.aspect.value
                text = value.decode() if isinstance(value, bytes) else str(value)
                with self._lock:
                    self.arrivals.setdefault((str(mcp.entityUrn), str(mcp.aspectName)), []).append((now, text))

    def arrival(self, urn: str, aspect: str, marker: str, after: float) -> float | None:
        with self._lock:
            for t, text in self.arrivals.get((urn, aspect), []):
                if t >= after and marker in text:
                    return t
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


@dataclass
class Write:
    started: float
    urn: str
    aspect: str
    marker: str


def webhooks_available() -> bool:
    """Does the installed connector have the webhook receiver yet (config key and command)?"""
    from connector.config import ConnectorConfig

    if "webhooks" not in ConnectorConfig.model_fields:
        return False
    return subprocess.run(connector_cli("webhooks", "--help"), cwd=REPO, capture_output=True).returncode == 0


def measure_writes(b: Bench, tracker: McpTracker, label: str, count: int, write: Callable[[int, str], Write],
                   wait: float) -> dict[str, Any]:
    rng = random.Random(7)
    writes = []
    for i in range(count):
        writes.append(write(i, f"fresh-{label}-{i}-{uuid.uuid4().hex[:8]}"))
        time.sleep(rng.uniform(*b.args.write_spacing))
    deadline = time.monotonic() + wait
    latencies: list[float | None] = [None] * count
    while time.monotonic() < deadline:
        for i, w in enumerate(writes):
            if latencies[i] is None:
                t = tracker.arrival(w.urn, w.aspect, w.marker, w.started)
                latencies[i] = None if t is None else t - w.started
        if all(x is not None for x in latencies):
            break
        time.sleep(0.2)
    seen = [x for x in latencies if x is not None]
    figures: dict[str, Any] = {"writes": count, "arrived": len(seen)}
    if seen:
        figures.update(p50=percentile(seen, 50), p95=percentile(seen, 95), max=max(seen), min=min(seen))
    return figures


def part_d(b: Bench) -> None:
    from mlflow import MlflowClient

    from connector.datahub.mapping import MappingSettings, model_urn, run_urn

    poll = b.args.poll_interval
    extra: dict[str, Any] = {}
    # ---- WEBHOOKS ------------------------------------------------------------------------------
    # The connector's webhook receiver is being built: config key `webhooks: {listen, secret}` and
    # `mlflow-datahub webhooks install -c FILE` (registers the receiver with MLflow). With
    # --webhooks auto (the default) they are used as soon as the installed connector has both;
    # --webhooks on insists, --webhooks off measures polling only. The bench's MLflow server is
    # started with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS
    # so that it may deliver to a receiver on loopback over HTTP.
    webhooks = b.args.webhooks == "on" or (b.args.webhooks == "auto" and webhooks_available())
    if webhooks:
        extra["webhooks"] = {"listen": f"127.0.0.1:{free_port()}", "secret": uuid.uuid4().hex}
    path, data = b.config("freshness", extra=extra, uri=b.server.uri)  # no latency proxy: (a)-(c) only
    if webhooks:
        installed = subprocess.run(connector_cli("webhooks", "install", "-c", path), cwd=REPO, capture_output=True,
                                   text=True)
        if installed.returncode != 0:
            raise RuntimeError(f"webhooks install failed:\n{installed.stdout}\n{installed.stderr}")
    # ---------------------------------------------------------------------------------------------
    mode = "webhooks" if webhooks else f"polling every {poll:g} s"
    say(f"(d) freshness of `mlflow-datahub run` ({mode}): MLflow write -> its MCP read from the topic")
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-freshness"), b.workdir / "freshness")
    client = MlflowClient(b.server.uri, registry_uri=b.server.uri)
    settings = MappingSettings()
    experiment = client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}0000")
    assert experiment is not None
    tracker = None
    try:
        wait_snapshot_consumed(b.connection, child, data, b.args.timeout)
        tracker = McpTracker(b.connection, data["kafka"]["topics"]["mcp"],
                             {"mlModelProperties", "dataProcessInstanceProperties"})

        def registry_change(i: int, marker: str) -> Write:
            name = f"{MODEL_PREFIX}{i % b.shape.models:04d}"
            version = str(1 + (i // b.shape.models) % b.shape.versions_per_model)
            started = time.time()
            client.set_model_version_tag(name, version, "bench_freshness", marker)
            return Write(started, model_urn(name, version, settings), "mlModelProperties", marker)

        def new_run(i: int, marker: str) -> Write:
            started = time.time()
            run = client.create_run(experiment.experiment_id, run_name=marker)
            return Write(started, run_urn(run.info.run_id), "dataProcessInstanceProperties", marker)

        wait = 10 * poll + b.args.timeout
        registry = measure_writes(b, tracker, "registry", b.args.writes, registry_change, wait)
        registry["mode"] = mode
        say(f"    registry change (model version tag), {mode}: " + describe_latency(registry))
        runs = measure_writes(b, tracker, "run", b.args.writes, new_run, wait)
        runs["mode"] = f"polling every {poll:g} s"
        say(f"    new run, polling every {poll:g} s: " + describe_latency(runs))
        b.record("d", {"registry": registry, "run": runs, "poll_interval": poll, "webhooks": webhooks})
    finally:
        if tracker is not None:
            tracker.close()
        fin = child.stop()
        if fin.rc not in (0, -signal.SIGTERM):
            say(f"    run exited {fin.rc}:\n{tail(fin.stderr)}")


def describe_latency(f: dict[str, Any]) -> str:
    if not f.get("arrived"):
        return f"none of {f['writes']} writes arrived"
    text = f"p50 {f['p50']:.2f} s, p95 {f['p95']:.2f} s, max {f['max']:.2f} s over {f['arrived']} writes"
    if f["arrived"] < f["writes"]:
        text += f" ({f['writes'] - f['arrived']} never arrived)"
    return text
