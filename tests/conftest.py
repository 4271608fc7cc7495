"""Shared fixtures: the real stack (Kafka, schema registry), real MLflow servers, and isolated
configurations (own topics, consumer group and transactional ids per test).

Addresses in the environment override the local stack: KAFKA_BOOTSTRAP_SERVERS and
SCHEMA_REGISTRY_URL. Otherwise `connector.stack` installs and starts the local stack (and stops it
at the end if it started it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Message

from connector.config import ConnectorConfig, KafkaConfig, parse
from connector.devstack.layout import ENV_STACK_DIR, PORT_ENV
from connector.devstack.mlflow_server import MlflowServer, MlflowVersionMissing, mlflow2_python
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import read_committed

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Kafka:
    bootstrap: str
    registry: str


@pytest.fixture(scope="session")
def kafka() -> Iterator[Kafka]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    registry = os.environ.get("SCHEMA_REGISTRY_URL")
    if bootstrap and registry:
        yield Kafka(bootstrap, registry)
        return
    from connector.devstack import stack

    was_running = {s.name for s in stack.status() if s.running}
    endpoints = stack.up()
    yield Kafka(endpoints.kafka_bootstrap_servers, endpoints.schema_registry_url)
    if not was_running and not os.environ.get("KEEP_STACK"):
        stack.down()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow store that new servers copy (saves the migrations at start-up)."""
    workdir = tmp_path_factory.mktemp("mlflow-template")
    server = MlflowServer(workdir).start()
    server.stop()
    return server.db


@pytest.fixture(scope="session")
def mlflow_factory(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
                   ) -> Iterator[Callable[[], MlflowServer]]:
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow"), mlflow_template).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def demo_mlflow(mlflow_factory: Callable[[], MlflowServer]) -> MlflowServer:
    """A server holding the demo content (connector.demo); tests must not change it."""
    from connector.devstack.demo import populate

    server = mlflow_factory()
    populate(server.uri)
    return server


@pytest.fixture(scope="module")
def own_mlflow(mlflow_factory: Callable[[], MlflowServer]) -> MlflowServer:
    """A fresh server for one test module, which may change it."""
    return mlflow_factory()


ConfigFactory = Callable[..., tuple[Path, ConnectorConfig]]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_config(kafka: Kafka, tmp_path: Path) -> ConfigFactory:
    """A configuration file with topics, group and transactional ids of this test's own."""

    def make(mlflow_uri: str, extra: dict[str, Any] | None = None, name: str = "connector.yml"
             ) -> tuple[Path, ConnectorConfig]:
        prefix = f"t{uuid.uuid4().hex[:10]}"
        data: dict[str, Any] = {
            "source": {"type": "mlflow", "config": {"tracking_uri": mlflow_uri,
                                                    "stateful_ingestion": {"enabled": True}}},
            "kafka": {
                "bootstrap_servers": kafka.bootstrap,
                "schema_registry_url": kafka.registry,
                "partitions": 3,
                "consumer_group": f"{prefix}-group",
                "transactional_id_prefix": prefix,
                "topics": {"changes": f"{prefix}.changes", "state": f"{prefix}.state",
                           "producer_offsets": f"{prefix}.producer-offsets",
                           "dead_letter": f"{prefix}.dlq", "mcp": f"{prefix}.mcp"},
            },
            "producer": {"poll_interval_seconds": 1},
        }
        data = _merge(data, extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path, parse(data)

    return make


def read_to_end(bootstrap: str, topic: str) -> Iterator[Message]:
    """Every committed record of a topic, from its beginning to its current end."""
    return read_committed(KafkaConnection(KafkaConfig(bootstrap_servers=bootstrap)), topic, role="test reader")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    """The real `mlflow-datahub` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO, env={**os.environ, **(env or {})},
    )


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free at the moment of asking."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def private_stack_env(root: Path) -> dict[str, str]:
    """The environment of a local stack of its own: its root, and a free port for every service (the
    variables of `connector.devstack.layout.PORT_ENV`), out of the way of the shared test stack."""
    return {ENV_STACK_DIR: str(root), **{var: str(port) for var, port in zip(PORT_ENV, free_ports(len(PORT_ENV)),
                                                                            strict=True)}}


@contextmanager
def mlflow2_server(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[MlflowServer, Path]]:
    """An MLflow 2.x server of its own (empty), and the Python of its venv; stopped afterwards. Without the 2.x
    venv the test fails: a skipped compatibility test would hide the check."""
    try:
        python = mlflow2_python()
    except MlflowVersionMissing as e:
        pytest.fail(str(e), pytrace=False)
    server = MlflowServer(tmp_path_factory.mktemp(name), python=python).start()
    try:
        yield server, python
    finally:
        server.stop()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`os.environ` with `values` set, restored afterwards (for code that reads the environment itself)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
