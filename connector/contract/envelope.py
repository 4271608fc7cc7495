"""The change-event envelope (Debezium's shape): an entity state wrapped with its operation, key,
source block and time; snapshot markers; the content fingerprint of a state. Pure."""

from __future__ import annotations

import hashlib
import json

from connector import __version__
from connector.contract.events import (
    SNAPSHOT_MARKER_KEY,
    ChangeEvent,
    Entity,
    EntityKind,
    Operation,
    SnapshotMarker,
    Source,
    entity_key,
)
from connector.redaction import without_credentials


def fingerprint(entity: Entity | None) -> str:
    """Content fingerprint of an entity state: equal states, equal fingerprints."""
    canonical = json.dumps(entity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def source_block(
    tracking_uri: str, registry_uri: str, read_at_ms: int, snapshot_id: str | None = None
) -> Source:
    return {
        "connector": "mlflow-datahub",
        "version": __version__,
        "tracking_uri": without_credentials(tracking_uri),
        "registry_uri": without_credentials(registry_uri),
        "read_at_ms": read_at_ms,
        "snapshot_id": snapshot_id,
    }


def entity_changed(op: Operation, kind: EntityKind, entity: Entity, source: Source, ts_ms: int) -> ChangeEvent:
    return {"op": op, "kind": kind, "key": entity_key(kind, entity), "after": entity, "source": source, "ts_ms": ts_ms}


def entity_deleted(key: str, kind: EntityKind, source: Source, ts_ms: int) -> ChangeEvent:
    return {"op": "DELETE", "kind": kind, "key": key, "after": None, "source": source, "ts_ms": ts_ms}


def snapshot_marker(
    op: Operation, snapshot_id: str, partitions: int, source: Source, ts_ms: int,
    complete: bool = False, entities: int = 0,
) -> ChangeEvent:
    marker: SnapshotMarker = {
        "snapshot_id": snapshot_id, "partitions": partitions, "complete": complete, "entities": entities,
    }
    return {"op": op, "kind": "SNAPSHOT", "key": SNAPSHOT_MARKER_KEY, "after": marker, "source": source,
            "ts_ms": ts_ms}


def changed_at_ms(event: ChangeEvent) -> int:
    """When MLflow changed what the event carries, as well as the event tells: the entity's own
    last-update time where MLflow keeps one (a run has only its start and end), else when it was read."""
    after = event["after"] or {}
    for field_name in ("last_updated_timestamp", "last_update_time", "end_time", "start_time"):
        value = after.get(field_name) if isinstance(after, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return event["source"]["read_at_ms"]
