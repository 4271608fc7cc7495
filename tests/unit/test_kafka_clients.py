"""The one Kafka edge: every client the connector builds is made in connector/kafka/clients.py, and
each receives the connection settings (security.protocol, sasl.*, ssl.*) by one rule."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from connector.config import parse
from connector.errors import ConfigError
from connector.kafka.clients import KafkaConnection, connection_settings, is_connection_key

CONNECTOR = Path(__file__).resolve().parents[2] / "connector"
CLIENT_CLASSES = {"Producer", "Consumer", "AdminClient", "SchemaRegistryClient", "DeserializingConsumer",
                  "SerializingProducer"}

SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "connector",
        "sasl.password": "s3cret", "ssl.ca.location": "/etc/kafka/ca.pem",
        "enable.ssl.certificate.verification": True}


def _connection(kafka: dict[str, Any]) -> KafkaConnection:
    cfg = parse({"source": {"type": "mlflow", "config": {"tracking_uri": "http://mlflow:5000"}},
                 "kafka": {"bootstrap_servers": "broker:9093", "schema_registry_url": "http://registry:8081",
                           **kafka}})
    return KafkaConnection(cfg.kafka)


def test_no_module_but_the_kafka_edge_constructs_a_client() -> None:
    builders = []
    for path in CONNECTOR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in CLIENT_CLASSES:
                    builders.append(str(path.relative_to(CONNECTOR)))
    assert builders and set(builders) == {"kafka/clients.py"}


# Every client of the connector, as its code builds it (role, and the settings of its own it adds).
CLIENTS = {
    "change producer (pipeline/producer.py)":
        lambda c: c.producer_settings("producer", {"transactional.id": "p", "linger.ms": 20}),
    "MCP writer (pipeline/consumer.py)":
        lambda c: c.producer_settings("consumer's MCP writer", {"transactional.id": "c", "linger.ms": 20}),
    "replay state writer (pipeline/replay.py)":
        lambda c: c.producer_settings("replay", {"transactional.id": "r"}),
    "change consumer (pipeline/consumer.py)":
        lambda c: c.group_consumer_settings("consumer", "mlflow-datahub", {"isolation.level": "read_committed"}),
    "topic reader: state restore, producer restore, dump, replay state (kafka/reading.py)":
        lambda c: c.reader_settings("state restore", "mlflow-datahub-reader", {"isolation.level": "read_committed"}),
    "lag probe (kafka/reading.py)":
        lambda c: c.reader_settings("lag probe", "mlflow-datahub", {"isolation.level": "read_committed"}),
    "admin: topics, replay offsets (kafka/topics.py, pipeline/replay.py)":
        lambda c: c.admin_settings(),
}


@pytest.mark.parametrize("section", ["connection_config", "producer_config", "consumer_config"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_receives_the_security_settings_written_once(section: str, client: str) -> None:
    settings = CLIENTS[client](_connection({section: SASL}))
    assert {k: settings.get(k) for k in SASL} == SASL
    assert settings["bootstrap.servers"] == "broker:9093"


def test_tuning_keys_reach_only_their_own_clients() -> None:
    connection = _connection({"producer_config": {"linger.ms": 5, "compression.type": "zstd"},
                              "consumer_config": {"session.timeout.ms": 30000, "group.id": "theirs"}})
    producer = CLIENTS["change producer (pipeline/producer.py)"](connection)
    consumer = CLIENTS["change consumer (pipeline/consumer.py)"](connection)
    reader = CLIENTS["topic reader: state restore, producer restore, dump, replay state (kafka/reading.py)"](connection)
    admin = connection.admin_settings()
    assert producer["compression.type"] == "zstd" and producer["linger.ms"] == 5  # the user's setting wins
    assert consumer["session.timeout.ms"] == 30000 and consumer["group.id"] == "theirs"
    assert "compression.type" not in consumer and "session.timeout.ms" not in producer
    assert reader["group.id"] == "mlflow-datahub-reader" and "session.timeout.ms" not in reader
    assert "compression.type" not in admin and "session.timeout.ms" not in admin


def test_schema_registry_client_gets_its_own_settings() -> None:
    connection = _connection({"schema_registry_config": {"basic.auth.user.info": "user:pw"}})
    assert connection.schema_registry_settings() == {"url": "http://registry:8081", "basic.auth.user.info": "user:pw"}


def test_conflicting_connection_settings_name_both_fields() -> None:
    with pytest.raises(ConfigError) as e:
        connection_settings({}, {"sasl.username": "a"}, {"sasl.username": "b"})
    assert "kafka.consumer_config.sasl.username" in str(e.value) and "kafka.producer_config" in str(e.value)
    assert "'b'" not in str(e.value) and "'a'" not in str(e.value)  # values are never echoed


def test_the_same_setting_in_two_sections_is_no_conflict() -> None:
    assert connection_settings({"security.protocol": "SSL"}, {"security.protocol": "SSL"}, {}) == {
        "security.protocol": "SSL"}


@pytest.mark.parametrize("key, expected", [
    ("security.protocol", True), ("sasl.mechanism", True), ("sasl.oauthbearer.config", True),
    ("ssl.ca.location", True), ("enable.ssl.certificate.verification", True), ("oauth_cb", True),
    ("linger.ms", False), ("group.id", False), ("security", False), ("transactional.id", False),
])
def test_connection_keys(key: str, expected: bool) -> None:
    assert is_connection_key(key) is expected


def test_librdkafka_accepts_every_clients_settings() -> None:
    """The settings are real librdkafka configuration: each client is constructed (nothing is sent:
    the broker address does not answer, and each client is closed at once)."""
    connection = _connection({"connection_config": {"security.protocol": "SASL_PLAINTEXT",
                                                    "sasl.mechanism": "PLAIN", "sasl.username": "u",
                                                    "sasl.password": "p"}})
    for name, build in CLIENTS.items():
        settings = build(connection)
        if "transactional.id" in settings or name.startswith("change producer"):
            Producer(settings).flush(0)
        elif "group.id" in settings:
            Consumer(settings).close()
        else:
            AdminClient(settings)
