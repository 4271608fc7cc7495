"""Real-process tests of connector.stack: Kafka, the schema registry and MLflow on loopback.

The stack under test lives in a temporary root on free ports, so it never collides with the
project's shared stack; the downloaded jars come from the shared cache (MLFLOW_DATAHUB_CACHE_DIR,
default <repo>/.cache/downloads), so only the very first run downloads anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from connector.devstack import stack
from tests.conftest import free_ports, private_stack_env, run_cli

PORT_VARS = (
    "MLFLOW_DATAHUB_KAFKA_PORT",
    "MLFLOW_DATAHUB_CONTROLLER_PORT",
    "MLFLOW_DATAHUB_REGISTRY_PORT",
    "MLFLOW_DATAHUB_MLFLOW_PORT",
)
SECURE_PORT_VARS = ("MLFLOW_DATAHUB_KAFKA_SASL_PORT", "MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT")


@dataclass(frozen=True)
class RunningStack:
    root: Path
    ports: dict[str, int]
    endpoints: stack.Endpoints


def _pids(root: Path) -> dict[str, int | None]:
    return {s.name: s.pid for s in stack.status(root)}


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("stack-root")
    env = private_stack_env(root)
    ports = {var: int(value) for var, value in env.items() if var in PORT_VARS + SECURE_PORT_VARS}
    with pytest.MonkeyPatch.context() as patch:
        for var, value in env.items():
            patch.setenv(var, value)
        try:
            endpoints = stack.up()
            yield RunningStack(root=root, ports=ports, endpoints=endpoints)
        finally:
            stack.down()


def _consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0,
                 settings: dict[str, str] | None = None) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            **(settings or {}),
        }
    )
    values: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(values) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            values.append(message.value())
    finally:
        consumer.close()
    return values


def _produce(bootstrap: str, topic: str, value: bytes, settings: dict[str, str] | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, **(settings or {})})
    producer.produce(topic, value)
    assert producer.flush(30) == 0


def test_up_reports_endpoints_and_status(running: RunningStack) -> None:
    ports = running.ports
    assert running.endpoints == stack.Endpoints(
        kafka_bootstrap_servers=f"127.0.0.1:{ports['MLFLOW_DATAHUB_KAFKA_PORT']}",
        schema_registry_url=f"http://127.0.0.1:{ports['MLFLOW_DATAHUB_REGISTRY_PORT']}/apis/ccompat/v7",
        mlflow_tracking_uri=f"http://127.0.0.1:{ports['MLFLOW_DATAHUB_MLFLOW_PORT']}",
    )
    assert running.endpoints.as_env_lines() == [
        f"KAFKA_BOOTSTRAP_SERVERS={running.endpoints.kafka_bootstrap_servers}",
        f"SCHEMA_REGISTRY_URL={running.endpoints.schema_registry_url}",
        f"MLFLOW_TRACKING_URI={running.endpoints.mlflow_tracking_uri}",
    ]
    statuses = stack.status()
    assert [s.name for s in statuses] == ["kafka", "schema-registry", "mlflow"]
    for service in statuses:
        assert service.running and service.pid is not None and _pid_alive(service.pid), service
        assert service.log_file.is_file() and service.log_file.is_relative_to(running.root)
        assert (running.root / service.name / "pid").read_text().strip() == str(service.pid)
    assert statuses[0].address == running.endpoints.kafka_bootstrap_servers


def test_second_up_reuses_running_services(running: RunningStack) -> None:
    before = _pids(running.root)
    messages: list[str] = []
    started = time.monotonic()
    assert stack.up(progress=messages.append) == running.endpoints
    assert time.monotonic() - started < 15
    assert _pids(running.root) == before
    assert all("already running" in m for m in messages), messages


def test_kafka_produce_and_consume(running: RunningStack) -> None:
    bootstrap = running.endpoints.kafka_bootstrap_servers
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, b"hello")
    assert _consume_all(bootstrap, topic, expected=1) == [b"hello"]


def test_transactional_producer_commits(running: RunningStack) -> None:
    bootstrap = running.endpoints.kafka_bootstrap_servers
    topic = f"stack-txn-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"txn-{uuid.uuid4().hex}"})
    producer.init_transactions(60)
    producer.begin_transaction()
    producer.produce(topic, b"committed")
    producer.commit_transaction(60)
    assert _consume_all(bootstrap, topic, expected=1) == [b"committed"]


def test_schema_registry_round_trip(running: RunningStack) -> None:
    client = SchemaRegistryClient({"url": running.endpoints.schema_registry_url})
    subject = f"stack-test-{uuid.uuid4().hex[:8]}-value"
    v1 = {"type": "record", "name": "Thing", "fields": [{"name": "a", "type": "string"}]}
    v2 = {
        "type": "record",
        "name": "Thing",
        "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": ["null", "long"], "default": None}],
    }
    id1 = client.register_schema(subject, Schema(json.dumps(v1), "AVRO"))
    id2 = client.register_schema(subject, Schema(json.dumps(v2), "AVRO"))
    assert id1 != id2
    fresh = SchemaRegistryClient({"url": running.endpoints.schema_registry_url})  # no cache
    assert json.loads(fresh.get_schema(id1).schema_str) == v1
    latest = fresh.get_latest_version(subject)
    assert (latest.schema_id, latest.version) == (id2, 2)
    # Confluent's default BACKWARD compatibility is enforced.
    incompatible = {"type": "record", "name": "Thing", "fields": [{"name": "a", "type": "long"}]}
    with pytest.raises(SchemaRegistryError) as error:
        fresh.register_schema(subject, Schema(json.dumps(incompatible), "AVRO"))
    assert error.value.http_status_code == 409


def test_mlflow_create_experiment(running: RunningStack) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=running.endpoints.mlflow_tracking_uri)
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    assert client.get_experiment_by_name(name).experiment_id == experiment_id


def test_up_secure_adds_the_secured_listeners(running: RunningStack) -> None:
    """`stack up --secure` on a running stack: the broker restarts with SASL_PLAINTEXT and SASL_SSL
    listeners (PLAIN, SCRAM-SHA-512; a local CA), says how to connect, never prints the password."""
    ports = running.ports
    before = _pids(running.root)
    result = run_cli("stack", "up", "--secure", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:3] == running.endpoints.as_env_lines()  # the usual lines first, unchanged
    values = dict(line.split("=", 1) for line in lines)
    sasl_ssl = f"127.0.0.1:{ports['MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT']}"
    sasl_plaintext = f"127.0.0.1:{ports['MLFLOW_DATAHUB_KAFKA_SASL_PORT']}"
    secure_dir = running.root / "kafka" / "secure"
    assert values == {**values, "KAFKA_SASL_SSL_BOOTSTRAP_SERVERS": sasl_ssl,
                      "KAFKA_SASL_PLAINTEXT_BOOTSTRAP_SERVERS": sasl_plaintext,
                      "KAFKA_SASL_MECHANISMS": "PLAIN,SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "connector",
                      "KAFKA_SSL_CA_LOCATION": str(secure_dir / "tls" / "ca.pem"),
                      "KAFKA_CLIENT_PROPERTIES": str(secure_dir / "client.properties")}
    properties = Path(values["KAFKA_CLIENT_PROPERTIES"])
    assert properties.stat().st_mode & 0o077 == 0  # it holds the password
    scram = {k: v for k, v in (line.split("=", 1) for line in properties.read_text().splitlines()
                               if "=" in line and not line.startswith("#"))}
    password = scram.pop("sasl.password")
    assert password and password not in result.stdout + result.stderr
    assert scram == {"bootstrap.servers": sasl_ssl, "security.protocol": "SASL_SSL",
                     "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "connector",
                     "ssl.ca.location": values["KAFKA_SSL_CA_LOCATION"]}
    after = _pids(running.root)
    assert after["kafka"] != before["kafka"]  # restarted with the new listeners
    assert {k: v for k, v in after.items() if k != "kafka"} == {k: v for k, v in before.items() if k != "kafka"}

    status = run_cli("stack", "status")
    assert f"{sasl_ssl}" in status.stdout and f"{sasl_plaintext}" in status.stdout and "SASL_SSL" in status.stdout
    assert str(properties) in status.stdout and password not in status.stdout
    assert stack.status()[0].secure is not None

    # Both listeners take the credentials: SCRAM-SHA-512 over TLS, PLAIN without; PLAINTEXT is unchanged.
    topic = f"stack-secure-{uuid.uuid4().hex[:8]}"
    plain = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "connector",
             "sasl.password": password}
    _produce(sasl_ssl, topic, b"over TLS", {**scram, "sasl.password": password})
    _produce(sasl_plaintext, topic, b"over SASL", plain)
    _produce(running.endpoints.kafka_bootstrap_servers, topic, b"in the clear")
    assert _consume_all(sasl_plaintext, topic, expected=3, settings={**plain, "sasl.mechanism": "SCRAM-SHA-512"}) == [
        b"over TLS", b"over SASL", b"in the clear"]

    # A second `up --secure` (and a plain `up`) keeps the running broker.
    assert run_cli("stack", "up", "--secure", timeout=120).returncode == 0
    assert stack.up().secure is not None and _pids(running.root) == after


def test_kafka_restart_keeps_data(running: RunningStack) -> None:
    bootstrap = running.endpoints.kafka_bootstrap_servers
    topic = f"stack-restart-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, b"before restart")
    old = _pids(running.root)
    secure_before = stack.status()[0].secure
    stack.kafka_restart()
    new = _pids(running.root)
    assert stack.status()[0].secure == secure_before  # the secured listeners too, when it had them
    assert new["kafka"] is not None and new["kafka"] != old["kafka"]
    assert not _pid_alive(old["kafka"] or 0)
    assert {k: v for k, v in new.items() if k != "kafka"} == {k: v for k, v in old.items() if k != "kafka"}
    _produce(bootstrap, topic, b"after restart")
    assert _consume_all(bootstrap, topic, expected=2) == [b"before restart", b"after restart"]


def test_registry_and_mlflow_stop_start(running: RunningStack) -> None:
    client = SchemaRegistryClient({"url": running.endpoints.schema_registry_url})
    subject = f"stack-persist-{uuid.uuid4().hex[:8]}-value"
    schema = {"type": "record", "name": "P", "fields": [{"name": "x", "type": "int"}]}
    schema_id = client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))

    stack.registry_stop()
    stack.mlflow_stop()
    down = {s.name: s.running for s in stack.status()}
    assert down == {"kafka": True, "schema-registry": False, "mlflow": False}

    stack.registry_start()
    stack.mlflow_start()
    assert all(s.running for s in stack.status())
    # Schemas survive a registry restart (Kafka data does too, and messages carry schema ids).
    fresh = SchemaRegistryClient({"url": running.endpoints.schema_registry_url})
    assert json.loads(fresh.get_schema(schema_id).schema_str) == schema


def test_port_in_use(running: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DATAHUB_STACK_DIR", str(tmp_path / "other"))
    kafka_port = running.ports["MLFLOW_DATAHUB_KAFKA_PORT"]
    # The running stack's broker is "another process" for a second root.
    expected = rf"port {kafka_port} \(kafka\) is in use.*MLFLOW_DATAHUB_KAFKA_PORT"
    with pytest.raises(stack.StackError, match=expected):
        stack.up()

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        for var, port in zip(PORT_VARS[:3], free_ports(3), strict=True):
            monkeypatch.setenv(var, str(port))
        monkeypatch.setenv("MLFLOW_DATAHUB_MLFLOW_PORT", str(taken))
        with pytest.raises(stack.StackError, match=rf"^port {taken} \(mlflow\) is in use by another process"):
            stack.up()
    assert not any(s.running for s in stack.status())


def test_missing_java_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setenv("MLFLOW_DATAHUB_STACK_DIR", str(tmp_path / "root"))
    for var, port in zip(PORT_VARS, free_ports(len(PORT_VARS)), strict=True):
        monkeypatch.setenv(var, str(port))
    with pytest.raises(stack.StackError, match="Java 17 or newer is required"):
        stack.up()


def test_down_ignores_foreign_pid(tmp_path: Path) -> None:
    """A pid file pointing at a process we did not start (e.g. a recycled pid) is left alone."""
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        service_dir = tmp_path / "mlflow"
        service_dir.mkdir()
        (service_dir / "pid").write_text(f"{stranger.pid}\n")
        launch = {"argv": ["python", "-m", "mlflow", "server"], "address": "127.0.0.1:1"}
        (service_dir / "launch.json").write_text(json.dumps(launch))
        assert not any(s.running for s in stack.status(tmp_path))
        assert stack.down(tmp_path) == []
        assert stranger.poll() is None
        assert not (service_dir / "pid").exists()  # the stale pid file is cleaned up
    finally:
        stranger.kill()
        stranger.wait()


def test_down_stops_exactly_our_services(running: RunningStack) -> None:
    pids = _pids(running.root)
    assert all(pids.values())
    assert sorted(stack.down()) == ["kafka", "mlflow", "schema-registry"]
    for name, pid in pids.items():
        assert pid is not None and not _pid_alive(pid), name
        assert not (running.root / name / "pid").exists()
    assert [(s.name, s.running, s.pid) for s in stack.status()] == [
        ("kafka", False, None),
        ("schema-registry", False, None),
        ("mlflow", False, None),
    ]
    assert stack.down() == []
    # Data stays for a later `up`.
    assert (running.root / "kafka" / "data" / "meta.properties").is_file()
    assert (running.root / "mlflow" / "mlflow.db").is_file()
    assert os.listdir(running.root / "schema-registry" / "data")
