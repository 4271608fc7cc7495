"""Configuration: the original recipe's `source` block, field for field, plus a `kafka` section.

```yaml
source:
  type: mlflow
  config: {tracking_uri, registry_uri, model_name_separator, base_external_url, env,
           stateful_ingestion: {enabled, remove_stale_metadata, fail_safe_threshold}, ...}
kafka: {bootstrap_servers, schema_registry_url, topics: {...}, ...}
```
Unknown fields and wrong types stop start-up with a message naming the field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from datahub.configuration.source_common import ALL_ENV_TYPES
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from connector.errors import ConfigError
from connector.redaction import remember_secrets, secret_values

if TYPE_CHECKING:  # imported where used: the consumer needs no MLflow client, the producer no DataHub model
    from connector.datahub.mapping import MappingSettings

log = logging.getLogger(__name__)

# Top-level recipe keys that configure DataHub's ingestion pipeline, not the source.
RECIPE_PIPELINE_KEYS = ("run_id", "datahub_api", "transformers", "reporting", "flags", "failure_log")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatefulIngestion(_Strict):
    enabled: bool = False
    remove_stale_metadata: bool = True
    fail_safe_threshold: float = Field(default=75.0, ge=0, le=100)
    # The original's hidden settings of its checkpoint store: accepted so a recipe loads, unused here
    # (the state lives in the compacted state topic).
    max_checkpoint_state_size: int | None = Field(default=None, gt=0)
    state_provider: dict[str, Any] | None = None
    ignore_old_state: bool = False
    ignore_new_state: bool = False


class MLflowSourceConfig(_Strict):
    """The original `MLflowConfig`, field for field."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    model_name_separator: str = "_"
    base_external_url: str | None = None
    env: str = "PROD"
    materialize_dataset_inputs: bool = False
    source_mapping_to_platform: dict[str, str] | None = None
    username: str | None = None
    password: SecretStr | None = None
    # Not in the original (which reads MLFLOW_TRACKING_TOKEN from the environment): a bearer token
    # for MLflow servers behind token authentication, given to this connection only.
    token: SecretStr | None = None
    stateful_ingestion: StatefulIngestion | None = None

    @field_validator("env", mode="after")
    @classmethod
    def _env_known(cls, value: str) -> str:
        """As the original's EnvConfigMixin: one of DataHub's environments, upper-cased."""
        if value.upper() not in ALL_ENV_TYPES:
            raise ValueError(f"env must be one of {sorted(ALL_ENV_TYPES)}, found {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _credentials_together(self) -> MLflowSourceConfig:
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password must be set together")
        return self

    def resolved_tracking_uri(self) -> str:
        """The configured URI, else MLflow's MLFLOW_TRACKING_URI. (The original would fall back to a
        local `mlruns` directory; a stream beside Kafka needs a server, so that is an error here.)"""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError("source.config.tracking_uri: not set, and MLFLOW_TRACKING_URI is not set either")
        return uri

    def resolved_registry_uri(self) -> str:
        return self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.resolved_tracking_uri()


class Source(_Strict):
    type: Literal["mlflow"]
    config: MLflowSourceConfig = MLflowSourceConfig()


class Topics(_Strict):
    changes: str = "mlflow.changes"
    state: str = "mlflow.state"
    producer_offsets: str = "mlflow.producer-offsets"
    dead_letter: str = "mlflow.changes.dlq"
    mcp: str = "MetadataChangeProposal_v1"


class KafkaConfig(_Strict):
    bootstrap_servers: str | None = None
    schema_registry_url: str | None = None
    schema_registry_config: dict[str, Any] = {}
    topics: Topics = Topics()
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    consumer_group: str = "mlflow-datahub"
    transactional_id_prefix: str = "mlflow-datahub"
    # librdkafka settings of the connection (security.protocol, sasl.*, ssl.*), for every client:
    # see connector/kafka/clients.py for the rule.
    connection_config: dict[str, Any] = {}
    producer_config: dict[str, Any] = {}
    consumer_config: dict[str, Any] = {}

    def resolved_bootstrap(self) -> str:
        servers = self.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not servers:
            raise ConfigError("kafka.bootstrap_servers: not set, and KAFKA_BOOTSTRAP_SERVERS is not set either")
        return servers

    def resolved_schema_registry(self) -> str:
        url = self.schema_registry_url or os.environ.get("SCHEMA_REGISTRY_URL")
        if not url:
            raise ConfigError("kafka.schema_registry_url: not set, and SCHEMA_REGISTRY_URL is not set either")
        return url


class ProducerSettings(_Strict):
    poll_interval_seconds: float = Field(default=5.0, gt=0)
    reconcile_interval_seconds: float = Field(default=3600.0, gt=0)
    watermark_overlap_seconds: float = Field(default=5.0, ge=0)
    # Pages of 500: the consumer works on one page's events while MLflow serves the next, so a
    # listing ends with at most a page of work left; larger pages save little at MLflow.
    page_size: int = Field(default=500, ge=1, le=50000)
    model_version_page_size: int = Field(default=10000, ge=1, le=200000)
    max_requests_per_second: float | None = Field(default=None, gt=0)
    transaction_size: int = Field(default=500, ge=1)


class ConsumerSettings(_Strict):
    batch_size: int = Field(default=500, ge=1)
    max_message_bytes: int = Field(default=1_000_000, ge=10_000)


WEBHOOK_SECRET_ENV = "MLFLOW_DATAHUB_WEBHOOK_SECRET"


class WebhooksConfig(_Strict):
    """MLflow webhooks (3.3+) received over HTTP; each names a registered model to re-read at once."""

    listen: str = "127.0.0.1:8790"
    url: str | None = None
    secret: SecretStr | None = None
    max_age_seconds: float = Field(default=300.0, gt=0)
    name: str = "mlflow-datahub"

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8790 or [::1]:8790")
        return value

    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def resolved_url(self) -> str:
        """The URL MLflow calls: `url`, else this receiver's own address."""
        if self.url:
            return self.url
        host, port = self.listen_address()
        if host in ("", "0.0.0.0", "::"):
            raise ConfigError(f"webhooks.url: required when webhooks.listen ({self.listen}) binds every interface")
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/webhooks/mlflow"

    def resolved_secret(self) -> str:
        secret = self.secret.get_secret_value() if self.secret else os.environ.get(WEBHOOK_SECRET_ENV)
        if not secret:
            raise ConfigError(f"webhooks.secret: not set, and {WEBHOOK_SECRET_ENV} is not set either "
                              "(a webhook without a secret cannot be verified)")
        return secret


class SinkConfig(BaseModel):
    """The recipe's `sink` block is accepted so a recipe can be reused; a `datahub-kafka` sink's
    connection and MCP topic are taken as defaults for the `kafka` section."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    config: dict[str, Any] = {}


class ConnectorConfig(_Strict):
    source: Source
    sink: SinkConfig | None = None
    pipeline_name: str | None = None
    kafka: KafkaConfig = KafkaConfig()
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    webhooks: WebhooksConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_recipe(cls, data: Any) -> Any:
        """Reads a DataHub recipe as it is: pipeline-only keys are ignored with a warning, and a
        `datahub-kafka` sink's connection gives the `kafka` section its defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in RECIPE_PIPELINE_KEYS:
            if key in data:
                data.pop(key)
                log.warning("recipe field %r belongs to DataHub's ingestion pipeline: ignored", key)
        if "webhooks" in data and data["webhooks"] is None:
            data["webhooks"] = {}  # `webhooks:` with nothing under it switches them on with defaults
        sink = data.get("sink")
        if not isinstance(sink, dict):
            return data
        if sink.get("type") != "datahub-kafka":
            log.warning("sink of type %r ignored: the connector writes to DataHub's MCP topic (section `kafka`)",
                        sink.get("type"))
            return data
        sink_config = sink.get("config") or {}
        connection = sink_config.get("connection") or {}
        kafka = dict(data.get("kafka") or {})
        kafka.setdefault("bootstrap_servers", connection.get("bootstrap"))
        kafka.setdefault("schema_registry_url", connection.get("schema_registry_url"))
        kafka.setdefault("schema_registry_config", connection.get("schema_registry_config"))
        kafka.setdefault("producer_config", connection.get("producer_config"))
        mcp_topic = (sink_config.get("topic_routes") or {}).get("MetadataChangeProposal")
        if mcp_topic:
            kafka["topics"] = {**(kafka.get("topics") or {}), "mcp": mcp_topic}
        return {**data, "kafka": {k: v for k, v in kafka.items() if v is not None}}

    @property
    def mlflow(self) -> MLflowSourceConfig:
        return self.source.config

    @property
    def stateful(self) -> StatefulIngestion:
        return self.mlflow.stateful_ingestion or StatefulIngestion()

    def mapping_settings(self) -> MappingSettings:
        from connector.datahub.mapping import MappingSettings

        c = self.mlflow
        return MappingSettings(
            env=c.env,
            model_name_separator=c.model_name_separator,
            base_external_url=c.base_external_url,
            materialize_dataset_inputs=c.materialize_dataset_inputs,
            source_mapping_to_platform={k.lower(): v for k, v in (c.source_mapping_to_platform or {}).items()},
            run_id=self.pipeline_name or "mlflow-datahub",
        )


def _location(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))


# Where a value may hold a secret, or a whole block of settings: the error names the field, never the value.
_NEVER_ECHOED = ("password", "secret", "token", "sasl", "ssl", "auth", "_config", "connection", "credential", "key")


def describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = _location(e) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field")
        elif e["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        elif isinstance(e.get("input"), (dict, list)) or any(word in where.lower() for word in _NEVER_ECHOED):
            lines.append(f"{where}: {e['msg']}")  # never echo a block or a secret back
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, with a key given twice in one mapping as an error (YAML keeps the last
    silently: a duplicated `password:` or `tracking_uri:` would be a surprise)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in the same mapping")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, without the text of the line (it may hold a secret)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse(data: Any, origin: str = "configuration") -> ConnectorConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with `source:` and `kafka:` sections")
    remember_secrets(secret_values(data))  # masked in every line written from now on
    try:
        return ConnectorConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {describe(e)}") from None


def load(path: str | Path) -> ConnectorConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    return parse(data, str(path))
