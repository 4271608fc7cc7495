"""The producer's position, stored in the compacted producer-offsets topic (one record per pipeline)
and written in the same Kafka transaction as the events it accounts for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from connector.config import ConnectorConfig


def position_key(cfg: ConnectorConfig) -> bytes:
    return f"position:{cfg.pipeline_name or 'mlflow-datahub'}".encode()


def known_prefix(cfg: ConnectorConfig) -> bytes:
    """Keys of the summaries of published entities (connector.mlflow.incremental.Known.summary)."""
    return f"known:{cfg.pipeline_name or 'mlflow-datahub'}:".encode()


def known_key(cfg: ConnectorConfig, entity_key: str) -> bytes:
    return known_prefix(cfg) + entity_key.encode()


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

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Position:
        d = json.loads(data)
        return Position(d.get("snapshot_seq", 0), d.get("last_snapshot_ms"), dict(d.get("watermarks") or {}),
                        d.get("partitions"), d.get("running_snapshot"), d.get("last_snapshot"),
                        bool(d.get("known_summaries")))
