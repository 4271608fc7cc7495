"""Every Kafka and schema-registry client of the connector is built here, from `kafka.*`, by one rule.

- Every client gets `bootstrap.servers` and the *connection settings*: `kafka.connection_config`,
  plus the connection keys (`security.protocol`, `sasl.*`, `ssl.*`, ...; see `CONNECTION_KEYS`)
  found in `kafka.producer_config` and `kafka.consumer_config`, so a recipe whose `datahub-kafka`
  sink carries SASL settings in `producer_config` secures every client, readers and admin included.
  Two sections that give one connection key different values are a configuration error.
- Producers also get all of `kafka.producer_config`; the consumer that reads the change topic in
  the connector's group also gets all of `kafka.consumer_config`. Helper readers (state restore,
  read-to-end, lag probes) and the admin client get the connection settings only: a tuning key of
  the main consumer (`group.id`, `isolation.level`) must not change what they read.
- The schema registry client gets `kafka.schema_registry_url` and `kafka.schema_registry_config`.

Like quix-streams' `ConnectionConfig`: the connection is described once and every client is made
from it, so no client can connect without the credentials the others have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from connector.errors import ConfigError
from connector.kafka.client_logging import KafkaErrors, librdkafka_logger

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
    return settings


class KafkaConnection:
    """Builds the connector's Kafka clients and its schema-registry client from the `kafka` section."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.config = kafka
        self.bootstrap: str = kafka.resolved_bootstrap()
        self.connection: dict[str, Any] = connection_settings(
            kafka.connection_config, kafka.producer_config, kafka.consumer_config)

    def _base(self, role: str) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "logger": librdkafka_logger(),
                "error_cb": KafkaErrors(role, self.bootstrap), **self.connection}

    # -- what each client receives (pure; the unit tests list them) --------------------------------

    def producer_settings(self, role: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), **(settings or {}), **self.config.producer_config}

    def group_consumer_settings(self, role: str, group_id: str, settings: Settings = None) -> dict[str, Any]:
        return {**self._base(role), "group.id": group_id, **(settings or {}), **self.config.consumer_config}

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

    def reader(self, role: str, group_id: str = "mlflow-datahub-reader", settings: Settings = None) -> Consumer:
        """A helper reader: assign() only, never commits (read-to-end, state restore, probes)."""
        return Consumer(self.reader_settings(role, group_id, settings))

    def admin(self, settings: Settings = None) -> AdminClient:
        return AdminClient(self.admin_settings(settings))

    def schema_registry(self) -> SchemaRegistryClient:
        return SchemaRegistryClient(self.schema_registry_settings())


def broker_probe(bootstrap: str, settings: Settings = None) -> AdminClient:
    """An admin client for a health check of a broker that no configuration describes yet (the local
    stack's own broker while it starts): quiet, short timeouts."""
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "socket.timeout.ms": 5000, **(settings or {})})
