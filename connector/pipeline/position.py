"""The producer's position, stored in the compacted producer-offsets topic and written in the same Kafka
transaction as the events it accounts for.

The position and the summaries of published entities belong to one change topic: their keys name it
(`position@<changes topic>`, `known@<changes topic>:<entity key>`; a topic name has no `:`), and the
position records the MLflow it was read from. Pipelines that share the producer-offsets topic (the
default) thus never read each other's records, and a second MLflow configured onto a change topic that
holds another MLflow's changes stops at start-up instead of taking that MLflow's entities for gone.
Earlier versions keyed the records by `pipeline_name` (`position:<name>`, `known:<name>:`), which two
pipelines on one Kafka shared; those records are never read (see `ChangeProducer._restore`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from connector.config import ConnectorConfig
from connector.redaction import without_credentials


def position_key(cfg: ConnectorConfig) -> bytes:
    return f"position@{cfg.kafka.topics.changes}".encode()


def known_prefix(cfg: ConnectorConfig) -> bytes:
    """Keys of the summaries of published entities (connector.mlflow.incremental.Known.summary)."""
    return f"known@{cfg.kafka.topics.changes}:".encode()


def known_key(cfg: ConnectorConfig, entity_key: str) -> bytes:
    return known_prefix(cfg) + entity_key.encode()


def role_key(cfg: ConnectorConfig) -> bytes:
    """The record naming the instance that holds the producer role (connector.pipeline.producer_role)."""
    return f"role@{cfg.kafka.topics.changes}".encode()


def legacy_position_key(cfg: ConnectorConfig) -> bytes:
    """Where versions before the identity kept the position: by pipeline name, shared by pipelines."""
    return f"position:{cfg.pipeline_name or 'mlflow-datahub'}".encode()


def producer_id(cfg: ConnectorConfig) -> str:
    """The producer of a change topic: its `transactional.id`, and the consumer group whose one member
    holds the producer role. Named by the change topic, so that pipelines sharing a
    `transactional_id_prefix` (the default) never fence each other."""
    return f"{cfg.kafka.transactional_id_prefix}-producer-{cfg.kafka.topics.changes}"


def normalized_uri(uri: str) -> str:
    """A URI as an identity: without credentials, without a trailing `/`."""
    return without_credentials(uri).rstrip("/")


def identity(cfg: ConnectorConfig, tracking_uri: str, registry_uri: str) -> dict[str, str]:
    """What a position belongs to: the change topic and the MLflow it was read from."""
    return {"changes_topic": cfg.kafka.topics.changes, "tracking_uri": normalized_uri(tracking_uri),
            "registry_uri": normalized_uri(registry_uri)}


def identity_mismatch(stored: dict[str, str] | None, ours: dict[str, str]) -> str | None:
    """Why a stored position is not this configuration's (None: it is, or it predates identities). Pure."""
    if not stored:
        return None
    for name in ("changes_topic", "tracking_uri", "registry_uri"):
        if stored.get(name) and stored.get(name) != ours[name]:
            return f"its {name} is {stored[name]}, this configuration's is {ours[name]}"
    return None


@dataclass
class Position:
    """The producer's position, stored in the producer-offsets topic."""

    snapshot_seq: int = 0
    last_snapshot_ms: int | None = None
    watermarks: dict[str, int] = field(default_factory=dict)
    partitions: int | None = None  # of the change topic when this position was written
    running_snapshot: str | None = None  # the id of a snapshot begun and not ended
    # The last snapshot that ended: id, complete, ended_ms, seconds, entities (by kind), deletes, reason.
    last_snapshot: dict[str, Any] | None = None
    # Written by a producer that keeps entity summaries beside its position (an earlier version did not:
    # its first successor reads the change topic once instead).
    known_summaries: bool = False
    # The change topic and the MLflow this position was read from (`identity`); None: an earlier version.
    identity: dict[str, str] | None = None
    # The offset of the webhook-requests topic up to which the holder of the producer role has applied the
    # requests (None: none applied yet; a new holder starts at the topic's end).
    requests_offset: int | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Position:
        d = json.loads(data)
        return Position(d.get("snapshot_seq", 0), d.get("last_snapshot_ms"), dict(d.get("watermarks") or {}),
                        d.get("partitions"), d.get("running_snapshot"), d.get("last_snapshot"),
                        bool(d.get("known_summaries")), d.get("identity"), d.get("requests_offset"))
