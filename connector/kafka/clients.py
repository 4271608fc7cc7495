"""Every Kafka and schema-registry client of the connector is built here, from `kafka.*`, by one rule.

- Every client gets `bootstrap.servers` and the *connection settings*: `kafka.connection_config`,
  plus the connection keys (`security.protocol`, `sasl.*`, `ssl.*`, ...; see `CONNECTION_KEYS`)
  found in `kafka.producer_config` and `kafka.consumer_config`, so a recipe whose `datahub-kafka`
  sink carries SASL settings in `producer_config` secures every client, readers and admin included.
  Two sections that give one connection key different values are a configuration error.
- Producers also get all of `kafka.producer_config`; the consumer that reads the change topic in
  the connector's group also gets all of `kafka.consumer_config`. Helper readers (state restore,
  read-to-end, lag probes), the producer-role group's members and the admin client get the
  connection settings only: a tuning key of
  the main consumer (`group.id`, `isolation.level`) must not change what they read.
- The schema registry client gets `kafka.schema_registry_url` and `kafka.schema_registry_config`.

Like quix-streams' `ConnectionConfig`: the connection is described once and every client is made
from it, so no client can connect without the credentials the others have.

The clients of one `KafkaConnection` share one record of the security problems librdkafka reports
(wrong credentials, a mechanism the broker does not offer, a failed TLS handshake: errors it retries
forever); `cluster_metadata` turns one into a ConfigError that names the cause, the bootstrap address
and the `kafka.*` field to check, instead of "no broker answers". No setting's value is ever put in a
message (but the SASL user and mechanism).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ClusterMetadata
from confluent_kafka.schema_registry import SchemaRegistryClient

from connector.errors import ConfigError, first_line
from connector.kafka.client_logging import (
    ConnectionProblems,
    KafkaErrors,
    SecurityProblem,
    explain,
    librdkafka_logger,
)

if TYPE_CHECKING:
    from connector.config import KafkaConfig

Settings = Mapping[str, Any] | None  # librdkafka settings of one client, added to what the rule gives

# librdkafka settings that say how to reach and authenticate to the brokers: the same for every client.
CONNECTION_KEYS = ("security.protocol", "sasl.", "ssl.", "ssl_", "enable.ssl.certificate.verification",
                   "oauth_cb", "client.dns.lookup", "broker.address.family", "socket.connection.setup.timeout.ms")


def is_connection_key(key: str) -> bool:
    return any(key == k or (k.endswith((".", "_")) and key.startswith(k)) for k in CONNECTION_KEYS)


def connection_settings(connection_config: Mapping[str, Any], producer_config: Mapping[str, Any],
                        consumer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The connection settings every client gets (see the module's rule). Pure."""
    return _settings_and_origins(connection_config, producer_config, consumer_config)[0]


def _settings_and_origins(connection_config: Mapping[str, Any], producer_config: Mapping[str, Any],
                          consumer_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The connection settings, and the section each came from (`kafka.connection_config`, ...)."""
    settings = dict(connection_config)
    origin = {key: "kafka.connection_config" for key in settings}
    for section, config in (("kafka.producer_config", producer_config), ("kafka.consumer_config", consumer_config)):
        for key, value in config.items():
            if not is_connection_key(key):
                continue
            if key in settings and settings[key] != value:
                raise ConfigError(f"{section}.{key}: differs from {origin[key]}.{key}; a connection setting must "
                                  "be the same for every client (write it once, in kafka.connection_config)")
            settings[key] = value
            origin.setdefault(key, section)
    return settings, origin


class KafkaConnection:
    """Builds the connector's Kafka clients and its schema-registry client from the `kafka` section."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.config = kafka
        self.bootstrap: str = kafka.resolved_bootstrap()
        self.connection: dict[str, Any]
        self.connection, self.origins = _settings_and_origins(
            kafka.connection_config, kafka.producer_config, kafka.consumer_config)
        self.problems = ConnectionProblems()  # what this connection's clients reported about its security

    def _base(self, role: str) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "logger": librdkafka_logger(),
                "error_cb": KafkaErrors(role, self.bootstrap, problems=self.problems, words=self.explain),
                **self.connection}

    def explain(self, problem: SecurityProblem) -> str:
        """A security problem in one line: the cause, the bootstrap address, the `kafka.*` field to check."""
        return explain(problem, self.bootstrap, self.connection, self.origins)

    # -- the start-up check ------------------------------------------------------------------------

    def cluster_metadata(self, client: AdminClient, timeout: float = 15.0) -> ClusterMetadata:
        """The cluster's metadata (all topics), or a ConfigError that says why Kafka cannot be used: a
        security problem a client of this connection reported (authentication failed, mechanism not
        offered, TLS handshake failed), at once; else, after `timeout`, that no broker answers.

        librdkafka retries those problems forever and reports them only to `error_cb`, which an admin
        client runs in `poll()`: the metadata is asked for in slices of a second, polling in between."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return client.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
            except KafkaException as e:
                client.poll(0)  # runs the error callbacks: a security problem is recorded now
                problem = self.problems.latest()
                if problem is not None:
                    raise ConfigError(self.explain(problem)) from None
                if time.monotonic() >= deadline:
                    raise ConfigError(f"kafka.bootstrap_servers: no Kafka broker answers at {self.bootstrap} "
                                      f"({e.args[0]})") from None

    def refused_settings(self, error: KafkaException) -> ConfigError:
        """A client that librdkafka refused to create (an unknown setting, a mechanism it was built
        without), as a ConfigError naming the section of the setting it names."""
        text = error.args[0].str() if error.args and hasattr(error.args[0], "str") else str(error)
        named = re.search(r'property:? "([^"]+)"', text)
        key = named.group(1) if named else ("sasl.mechanism" if "SASL mechanism" in text else "")
        section = self.origins.get(key) or "kafka.connection_config"
        return ConfigError(f"{section}{'.' + key if key else ''}: librdkafka refuses the Kafka client settings "
                           f"({text})")

    # -- what each client receives (pure; the unit tests list them) --------------------------------

    def producer_settings(self, role: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), **(settings or {}), **self.config.producer_config}

    def group_consumer_settings(self, role: str, group_id: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), "group.id": group_id, **(settings or {}), **self.config.consumer_config}

    def membership_settings(self, role: str, group_id: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), "group.id": group_id, **(settings or {})}

    def reader_settings(self, role: str, group_id: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), "group.id": group_id, "enable.auto.commit": False, **(settings or {})}

    def admin_settings(self, settings: Settings = None) -> dict[str, Any]:
        return {**self._base("admin"), **(settings or {})}

    def schema_registry_settings(self) -> dict[str, Any]:
        return {"url": self.config.resolved_schema_registry(), **self.config.schema_registry_config}

    # -- the clients -------------------------------------------------------------------------------

    def producer(self, role: str, settings: Settings = None) -> Producer:
        """A producer; `transactional.id` among `settings` makes it transactional (see TransactionalWriter)."""
        return Producer(self.producer_settings(role, settings))

    def group_consumer(self, role: str, group_id: str, settings: Settings = None) -> Consumer:
        """The consumer of the change topic in a consumer group (subscribe, commit in transactions)."""
        return Consumer(self.group_consumer_settings(role, group_id, settings))

    def membership(self, role: str, group_id: str, settings: Settings = None) -> Consumer:
        """A member of a group that holds a role (connector/kafka/membership.py): the connection settings
        only, as a helper reader, since `kafka.consumer_config` tunes the change topic's consumer (its
        `group.id` must not move this member into that group)."""
        return Consumer(self.membership_settings(role, group_id, settings))

    def reader(self, role: str, group_id: str = "mlflow-datahub-reader", settings: Settings = None) -> Consumer:
        """A helper reader: assign() only, never commits (read-to-end, state restore, probes)."""
        return Consumer(self.reader_settings(role, group_id, settings))

    def admin(self, settings: Settings = None) -> AdminClient:
        return AdminClient(self.admin_settings(settings))

    def schema_registry(self) -> SchemaRegistryClient:
        try:
            return SchemaRegistryClient(self.schema_registry_settings())
        except ValueError as e:  # the client's own check of its settings: never echoes their values
            raise ConfigError(f"kafka.schema_registry_config: {first_line(e)}") from None


def broker_probe(bootstrap: str, settings: Settings = None) -> AdminClient:
    """An admin client for a health check of a broker that no configuration describes yet (the local
    stack's own broker while it starts): quiet, short timeouts."""
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "socket.timeout.ms": 5000, **(settings or {})})
