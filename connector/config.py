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
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from connector.errors import ConfigError
from connector.redaction import remember_secrets, secret_values

if TYPE_CHECKING:  # imported where used: the consumer needs no MLflow client, the producer no DataHub model
    from datahub.configuration.common import AllowDenyPattern

    from connector.datahub.mapping import MappingSettings

log = logging.getLogger(__name__)

# Top-level recipe keys that configure DataHub's ingestion pipeline, not the source.
# DataHub's environments (datahub.configuration.source_common.ALL_ENV_TYPES, FabricTypeClass), copied:
# importing DataHub's module to read them costs the command's start about a second. A unit test holds the
# copy to DataHub's own (tests/unit/test_startup_imports.py).
ALL_ENV_TYPES = frozenset({"CERT", "CORP", "DEV", "EI", "NON_PROD", "PRD", "PRE", "PROD", "QA", "RVW", "SANDBOX",
                           "SBX", "SIT", "STG", "TEST", "TST", "UAT"})

RECIPE_PIPELINE_KEYS = ("run_id", "datahub_api", "transformers", "reporting", "flags", "failure_log")


class _Strict(BaseModel):
    # A field's docstring is its description: docs/configuration.md is generated from the models
    # (connector/config_reference.py), with the environment variable of a field from `json_schema_extra`.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class StatefulIngestion(_Strict):
    """Detect Deleted Entities (the original's "stateful ingestion"): what is gone from MLflow is soft-deleted in
    DataHub (`status.removed=true`), with the state in Kafka (the compacted state topic), not in DataHub. How
    and when: docs/operations.md ("Deleted entities") and docs/compatibility.md (3.12)."""

    enabled: bool = False
    """Soft-delete what is gone from MLflow; off unless `true`. Unlike the original, `pipeline_name` is not
    required, and the switch is never turned on by itself."""
    remove_stale_metadata: bool = True
    """With `false` (or `enabled: false`) nothing is ever soft-deleted for being gone from MLflow."""
    fail_safe_threshold: float = Field(default=75.0, ge=0, le=100)
    """Percent of the known entities: if more of them would be removed at once, nothing is removed and a warning
    says so (the producer treats such a listing as failed and publishes no DELETE events). When a large deletion
    in MLflow is intended, raise it for one snapshot."""
    # The original's hidden settings of its checkpoint store: accepted so a recipe loads, unused here
    # (the state lives in the compacted state topic).
    max_checkpoint_state_size: int | None = Field(default=None, gt=0)
    """The original's hidden setting of its checkpoint store: accepted so that a recipe loads; unused."""
    state_provider: dict[str, Any] | None = None
    """The original's hidden setting of its checkpoint store: accepted so that a recipe loads; unused."""
    ignore_old_state: bool = False
    """The original's hidden setting of its checkpoint store: accepted so that a recipe loads; unused."""
    ignore_new_state: bool = False
    """The original's hidden setting of its checkpoint store: accepted so that a recipe loads; unused."""


class Pattern(_Strict):
    """DataHub's `AllowDenyPattern`, field for field (its fields are checked here; it is built where used,
    so that loading a configuration does not import DataHub's configuration package)."""

    allow: list[str] = [".*"]
    """Regular expressions: a name matching one of them is in scope..."""
    deny: list[str] = []
    """...unless it matches one of these."""
    ignoreCase: bool = True  # noqa: N815 (DataHub's name)
    """Match regardless of case."""

    @field_validator("allow", "deny")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a regular expression: {pattern!r} ({e})") from None
        return patterns

    def to_datahub(self) -> AllowDenyPattern:
        from datahub.configuration.common import AllowDenyPattern

        return AllowDenyPattern(allow=self.allow, deny=self.deny, ignoreCase=self.ignoreCase)


class MLflowSourceConfig(_Strict):
    """The original `MLflowConfig`, field for field."""

    tracking_uri: str | None = Field(default=None, json_schema_extra={"env": "MLFLOW_TRACKING_URI"})
    """URI of the MLflow tracking server. Unset here and in the environment: start-up stops (the connector reads
    an MLflow server; the original's fallback, a local `./mlruns` file store, does not apply)."""
    registry_uri: str | None = Field(default=None, json_schema_extra={"env": "MLFLOW_REGISTRY_URI"})
    """URI of the MLflow model registry. Unset here and in the environment: the tracking URI."""
    model_name_separator: str = "_"
    """Separates model name and version in a model version's name (`my_model_1`)."""
    base_external_url: str | None = None
    """Base of the "View in MLflow" links of model versions and (unlike the original) runs. Unset: the tracking
    URI if it is `http(s)`."""
    env: str = "PROD"
    """Environment in the URNs of model groups, models and (unlike the original) datasets: one of DataHub's
    environments (`PROD`, `DEV`, `QA`, ...), upper-cased."""
    materialize_dataset_inputs: bool = False
    """Also write the hosted dataset of a run's dataset input (needs a DataHub platform for its source type)."""
    source_mapping_to_platform: dict[str, str] | None = None
    """MLflow dataset source type -> DataHub platform (`{s3: s3, gs: gcs}`); keys are matched
    case-insensitively."""
    username: str | None = Field(default=None, json_schema_extra={"env": "MLFLOW_TRACKING_USERNAME"})
    """MLflow basic authentication, together with `password` (both or neither). Given to the connector's own
    connections to the tracking server, and to the registry only when it is on the same host; never exported
    to the environment. Unset: what MLflow's client reads from its environment, as in the original."""
    password: SecretStr | None = Field(default=None, json_schema_extra={"env": "MLFLOW_TRACKING_PASSWORD"})
    """MLflow basic authentication, together with `username` (both or neither); given per connection like
    `username`."""
    token: SecretStr | None = Field(default=None, json_schema_extra={"env": "MLFLOW_TRACKING_TOKEN"})
    """Not in the original: a bearer token for MLflow servers behind token authentication, given per connection
    like `username` and `password` (the original reads one only from `MLFLOW_TRACKING_TOKEN`)."""
    stateful_ingestion: StatefulIngestion | None = None
    """Detect Deleted Entities: soft-delete in DataHub what is gone from MLflow. Unset: off."""
    platform_instance: str | None = None
    """Not in the original: the name of this MLflow server in DataHub, for several MLflow servers in one DataHub.
    It goes into the URNs of experiments, model groups and models and into their `dataPlatformInstance`
    aspect, as DataHub's other sources do. Unset: the original's URNs."""
    experiment_pattern: Pattern = Pattern()
    """Not in the original: which experiments (by name; `allow`, `deny` regular expressions, `ignoreCase`) are
    read, with their runs. What leaves the scope is stale: soft-deleted like what is gone from MLflow."""
    model_pattern: Pattern = Pattern()
    """Not in the original: which registered models (by name) are read, with their versions. What leaves the
    scope is stale."""
    max_run_age_days: float | None = Field(default=None, gt=0)
    """Not in the original: only runs started within this many days are read (unset: all). A run that ages out
    of it is stale."""

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
    """The original recipe's `source` block, accepted as it is."""

    type: Literal["mlflow"]
    """Must be `mlflow`."""
    config: MLflowSourceConfig = MLflowSourceConfig()
    """The original's `MLflowConfig`, field for field (plus `token`)."""


class Topics(_Strict):
    """Topic names. The connector creates missing topics at start-up with their settings (docs/operations.md);
    connectors that share a Kafka cluster need topics of their own (but `mcp`)."""

    changes: str = "mlflow.changes"
    """The change topic: one Avro change event per entity change, keyed by entity (compacted); a public
    contract (schemas/README.md)."""
    state: str = "mlflow.state"
    """The consumer's state (compacted; as many partitions as the change topic): per URN the connector made
    exist, the key that owns it and the fingerprint of each aspect written."""
    producer_offsets: str = "mlflow.producer-offsets"
    """The producer's position (compacted, 1 partition): snapshot sequence, watermarks, partition count."""
    webhook_requests: str = "mlflow.webhook-requests"
    """Webhook deliveries accepted by any instance, for the holder of the producer role to apply (1 partition,
    7 days; created only when `webhooks` is set). Pipelines may share it: records are keyed by change topic."""
    dead_letter: str = "mlflow.changes.dlq"
    """Change-topic records that are not valid change events, with the error in their headers (28 days)."""
    mcp: str = "MetadataChangeProposal_v1"
    """DataHub's MCP topic, which DataHub's MCE consumer reads."""


class KafkaConfig(_Strict):
    """The connector's Kafka: DataHub's own Kafka in production, as the connector writes to DataHub's MCP topic.
    A `datahub-kafka` sink gives this section its defaults."""

    bootstrap_servers: str | None = Field(default=None, json_schema_extra={"env": "KAFKA_BOOTSTRAP_SERVERS"})
    """Kafka bootstrap servers. Unset here and in the environment: start-up stops."""
    schema_registry_url: str | None = Field(default=None, json_schema_extra={"env": "SCHEMA_REGISTRY_URL"})
    """Confluent-compatible schema registry for the MCP topic. DataHub GMS's
    (`http://<gms>:8080/schema-registry/api/`) works, as only the MCP schema, which GMS knows, is registered.
    Unset here and in the environment: start-up stops."""
    schema_registry_config: dict[str, Any] = {}
    """Extra settings of the schema-registry client (e.g. `basic.auth.user.info`)."""
    topics: Topics = Topics()
    """Topic names."""
    partitions: int = Field(default=3, ge=1)
    """Partitions of the change and state topics, when the connector creates them. The change topic's count must
    never change once written: the producer refuses to start on a different count."""
    replication_factor: int = Field(default=1, ge=1)
    """Replication factor of the topics the connector creates."""
    consumer_group: str = "mlflow-datahub"
    """Consumer group of the change topic."""
    transactional_id_prefix: str = "mlflow-datahub"
    """Prefix of the `transactional.id` of the producer and the consumers (both with the change topic's name,
    the consumers with their `--instance-id`) and a replay."""
    connection_config: dict[str, Any] = {}
    """librdkafka settings of the connection (`security.protocol`, `sasl.*`, `ssl.*`, ...), for every client:
    producers, consumers, helper readers and the admin client. Connection settings found in `producer_config`
    or `consumer_config` are given to every client too; two sections giving one of them different values are
    a configuration error (the rule: connector/kafka/clients.py)."""
    producer_config: dict[str, Any] = {}
    """librdkafka settings of the producers (on top of the connection settings)."""
    consumer_config: dict[str, Any] = {}
    """librdkafka settings of the consumer that reads the change topic in the connector's group (on top of the
    connection settings); helper readers get the connection settings only."""

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
    """The producer's tuning: how often and how MLflow is read (docs/operations.md, "Change detection and
    freshness")."""

    poll_interval_seconds: float = Field(default=5.0, gt=0)
    """An incremental cycle (what changed in MLflow) starts this often, counted from the start of the previous
    one; a cycle that overruns is followed at once."""
    reconcile_interval_seconds: float = Field(default=3600.0, gt=0)
    """A complete snapshot (and stale-entity check) this often, and at start."""
    watermark_overlap_seconds: float = Field(default=5.0, ge=0)
    """Watermarks overlap by this much so that a late commit in MLflow is not skipped (fingerprints keep the
    overlap from publishing anything twice)."""
    max_clock_skew_seconds: float = Field(default=3600.0, ge=0)
    """How far behind the producer's clock the clock of a client that logs runs may be: a run's `start_time`
    is that client's time, so each cycle looks for new runs this far back (the runs watermark never passes
    the producer's own clock)."""
    clock_skew_check_seconds: float = Field(default=60.0, gt=0)
    """How often a cycle looks back `max_clock_skew_seconds` for runs from clients with a slow clock (the
    other cycles look back `watermark_overlap_seconds` only, so an idle cycle reads one page of runs)."""
    page_size: int = Field(default=500, ge=1, le=50000)
    """Page size of MLflow's searches. The consumer works on one page's events while MLflow serves the next, so
    smaller pages leave less work after the last one; larger pages save little at MLflow."""
    model_version_page_size: int = Field(default=10000, ge=1, le=200000)
    """Page size of the model-version searches."""
    max_requests_per_second: float | None = Field(default=None, gt=0)
    """A limit of the request rate, for rate-limited managed MLflow servers (a 429 is retried after its
    Retry-After either way). Unset: no limit."""
    transaction_size: int = Field(default=500, ge=1)
    """Change events per Kafka transaction of the producer."""
    role_session_timeout_seconds: float = Field(default=10.0, ge=1, le=300)
    """Instances of `run` (and `produce`) side by side hold the producer role one at a time, through a Kafka
    consumer group: a holder silent this long (killed, cut off) is replaced by a standby. Shorter: a faster
    takeover; longer: fewer false takeovers on a slow network. The broker's `group.min.session.timeout.ms`
    (default 6 s) and `group.max.session.timeout.ms` bound it (docs/operations.md, Deployment)."""
    read_signatures: bool = True
    """Read each model version's signature (its `MLmodel` file: one artifact request per version, once ever) for
    its features (docs/compatibility.md 3.17). Off: versions carry no signature and models no features."""


class ConsumerSettings(_Strict):
    """The consumer's tuning."""

    batch_size: int = Field(default=500, ge=1)
    """Change events per Kafka transaction of the consumer (their MCPs, state changes and offsets)."""
    max_message_bytes: int = Field(default=1_000_000, ge=10_000)
    """Largest MCP written: the largest lists or maps of a larger aspect are truncated until it fits, as DataHub's
    `EnsureAspectSizeProcessor` does, with a warning naming the entity."""


WEBHOOK_SECRET_ENV = "MLFLOW_DATAHUB_WEBHOOK_SECRET"


class WebhooksConfig(_Strict):
    """MLflow webhooks (3.3+) received over HTTP; each names a registered model to re-read at once."""

    listen: str = "127.0.0.1:8790"
    """HOST:PORT the receiver listens on (`[::1]:8790` for IPv6); `run` and `produce` start it."""
    url: str | None = None
    """The URL MLflow calls. Unset: this receiver's own address (`http://HOST:PORT/webhooks/mlflow`), which
    is why it is required when `listen` binds every interface."""
    secret: SecretStr | None = Field(default=None, json_schema_extra={"env": WEBHOOK_SECRET_ENV})
    """Secret of the deliveries' HMAC-SHA256 signature (`X-MLflow-Signature`), shared with MLflow by
    `mlflow-datahub webhooks install`. Unset here and in the environment: start-up stops (a webhook without a
    secret cannot be verified)."""
    max_age_seconds: float = Field(default=300.0, gt=0)
    """A delivery whose timestamp is older or newer than this is refused (4xx and a log line, never an event)."""
    name: str = "mlflow-datahub"
    """Name of the webhook in MLflow, which `mlflow-datahub webhooks install` creates or updates."""
    max_connections: int = Field(default=64, ge=1, le=10_000)
    """Connections the receiver serves at once (a thread each). Past it, a new connection takes the place of the
    one that has waited longest, over a second, for its request (a slow or idle one); if none has, it gets a 503
    with `Retry-After: 1` at once (MLflow retries it)."""
    request_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """A whole request (request line, headers and body) must arrive within this, however slowly it trickles in;
    otherwise its connection is closed unanswered. Also how long a kept-alive connection may stay idle."""

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


class MetricsConfig(_Strict):
    """Prometheus metrics and health endpoints of `run`, `produce` and `consume` (off when the section is absent)."""

    listen: str = "127.0.0.1:9464"
    """HOST:PORT of the operations endpoint: `/metrics` for Prometheus, `/livez` and `/readyz` for probes."""
    stall_seconds: float = Field(default=120.0, gt=0)  # /livez: a loop without progress this long is stuck
    """`/livez` answers 503, naming the loop, when a loop of the process has made no progress for this long
    (stuck: a restart may help); waiting on a retried outage counts as progress."""
    check_interval_seconds: float = Field(default=10.0, gt=0)  # /readyz: how often MLflow, Kafka, registry are asked
    """How often `/readyz` asks MLflow, Kafka and the schema registry whether they answer (503 naming what does
    not; the process keeps running and retrying)."""

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9464")
        return value

    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class SinkConfig(BaseModel):
    """The recipe's `sink` block is accepted so a recipe can be reused; a `datahub-kafka` sink's
    connection and MCP topic are taken as defaults for the `kafka` section."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)
    type: str
    """The sink's type; only a `datahub-kafka` sink is read, any other is accepted and ignored with a warning
    (the connector always writes to Kafka)."""
    config: dict[str, Any] = {}
    """The sink's settings. Of a `datahub-kafka` sink: `connection.bootstrap`, `connection.schema_registry_url`,
    `connection.schema_registry_config` and `connection.producer_config` give `kafka.bootstrap_servers`,
    `kafka.schema_registry_url`, `kafka.schema_registry_config` and `kafka.producer_config` their defaults,
    `topic_routes.MetadataChangeProposal` gives `kafka.topics.mcp` its default; values set in `kafka` win."""


class ConnectorConfig(_Strict):
    """The file's top level: a DataHub recipe (`source`, `sink`, `pipeline_name`) with sections of its own."""

    source: Source
    """The original recipe's `source` block."""
    sink: SinkConfig | None = None
    """Optional, any type, so an existing recipe can be reused: a `datahub-kafka` sink gives `kafka` its
    defaults."""
    pipeline_name: str | None = None
    """Becomes the `systemMetadata.runId` of every MCP (unset: `mlflow-datahub`). Pipelines that share a Kafka
    cluster need their own `kafka.topics.changes`, `state` and `mcp`; the producer's position and role are named by
    the change topic, so the other names may be shared (docs/operations.md, Deployment)."""
    kafka: KafkaConfig = KafkaConfig()
    """The connector's Kafka and schema registry."""
    producer: ProducerSettings = ProducerSettings()
    """The producer's tuning."""
    consumer: ConsumerSettings = ConsumerSettings()
    """The consumer's tuning."""
    webhooks: WebhooksConfig | None = None
    """A receiver for MLflow 3.3+ webhooks, so that registry changes are read at once instead of at the next
    poll. Unset: no receiver; `webhooks:` with nothing under it: on, with the defaults."""
    metrics: MetricsConfig | None = None
    """Prometheus metrics and health endpoints. Unset: none; `metrics:` with nothing under it: on, with the
    defaults."""

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
        for section in ("webhooks", "metrics"):
            if section in data and data[section] is None:
                data[section] = {}  # `webhooks:` / `metrics:` with nothing under it: on, with defaults
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
            platform_instance=c.platform_instance,
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
