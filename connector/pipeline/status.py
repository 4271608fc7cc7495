"""`mlflow-datahub status`: what the connector's topics say about it, as Kafka Connect's status does.

Everything is read from Kafka, where the connector keeps its state: the producer's position (its last
snapshot, whether one runs, its watermarks), the consumer group's lag on the change topic, the URNs
the state topic knows to exist, the dead letters. Healthy: a complete snapshot ended within twice the
reconciliation interval (plus ten minutes), and change events are not left unread (lag with no
consumer in the group).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from connector.config import ConnectorConfig
from connector.contract.events import signature_to_read
from connector.datahub.decisions import FEATURE_URN_PREFIX, SNAPSHOT_KEY, Entry
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import consumer_lag, read_committed
from connector.pipeline.position import Position, known_prefix, position_key, producer_id, role_key

GRACE_SECONDS = 600.0


@dataclass
class Status:
    consumer_lag: dict[str, Any]
    last_complete_snapshot: dict[str, Any] | None
    snapshot_running: str | None
    entities_known: int
    entities_removed: int
    dead_letters: int
    producer_position: dict[str, Any] | None
    consumer_members: int | None
    healthy: bool
    problems: list[str] = field(default_factory=list)
    # The instance holding the producer role now (from its group), since when (its record), and the standbys.
    producer_role: dict[str, Any] | None = None
    # Each instance of the consumer group: its change-topic partitions.
    instances: dict[str, list[int]] = field(default_factory=dict)
    # Model versions whose signature is still to be read (the features pass after a snapshot; None: not read).
    signatures_unread: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def lines(self) -> list[str]:
        lag = self.consumer_lag
        snap = self.last_complete_snapshot
        out = [f"healthy: {'yes' if self.healthy else 'no'}" + (f" ({'; '.join(self.problems)})" if self.problems
                                                                  else "")]
        by_partition = ", ".join(f"p{p}: {n}" for p, n in lag["partitions"].items())
        out.append(f"consumer lag: {lag['total']} change events" + (f" ({by_partition})" if by_partition else "")
                   + (f"; {self.consumer_members} consumers in the group" if self.consumer_members is not None else ""))
        if snap is None:
            out.append("last complete snapshot: none")
        else:
            entities = ", ".join(f"{n} {k.lower()}" for k, n in (snap.get("entities") or {}).items())
            out.append(f"last complete snapshot: {snap.get('id')} ended {_iso(snap.get('ended_ms'))} "
                       f"({snap.get('seconds')} s; {sum((snap.get('entities') or {}).values())} entities"
                       f"{': ' + entities if entities else ''}; {snap.get('deletes', 0)} deletes)")
        out.append(f"snapshot running: {self.snapshot_running or 'no'}")
        out.append(f"entities known in DataHub: {self.entities_known} (soft-deleted: {self.entities_removed})")
        out.append(f"dead letters: {self.dead_letters}")
        if self.signatures_unread is not None:
            out.append(f"model versions whose signature is still to be read: {self.signatures_unread}"
                       + (" (the producer's features pass reads them)" if self.signatures_unread else ""))
        role = self.producer_role or {}
        if role.get("holder"):
            out.append(f"producer role: {role['holder']} since {_iso(role.get('since_ms'))}; standing by: "
                       + (", ".join(role.get("standbys") or []) or "none"))
        else:
            out.append("producer role: held by no instance")
        if self.instances:
            out.append("instances: " + "; ".join(f"{name} (partitions {', '.join(map(str, parts)) or 'none'})"
                                                 for name, parts in sorted(self.instances.items())))
        if self.producer_position is not None:
            marks = self.producer_position.get("watermarks") or {}
            out.append(f"producer position: snapshot {self.producer_position.get('snapshot_seq')}, watermarks "
                       + (", ".join(f"{k} {_iso(v)}" for k, v in sorted(marks.items())) or "none"))
        else:
            out.append("producer position: none (the producer has not run)")
        return out


def _iso(ms: Any) -> str:
    if not isinstance(ms, int):
        return "?"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_status(cfg: ConnectorConfig, now_ms: int | None = None) -> Status:
    k = cfg.kafka
    connection = KafkaConnection(k)
    now = int(time.time() * 1000) if now_ms is None else now_ms

    position: Position | None = None
    role_record: dict[str, Any] | None = None
    key, held_key, summaries = position_key(cfg), role_key(cfg), known_prefix(cfg)
    unread: dict[bytes, bool] = {}  # a model version's summary key -> whether its signature is still to be read
    for msg in read_committed(connection, k.topics.producer_offsets, role="status", settled=False):
        if msg.key() == key:
            position = Position.from_json(msg.value()) if msg.value() is not None else None
        elif msg.key() == held_key and msg.value() is not None:
            role_record = json.loads(msg.value())
        elif msg.key().startswith(summaries + b"model_version:"):
            if msg.value() is None:
                unread.pop(msg.key(), None)
            else:
                read = json.loads(msg.value()).get("sig") or {}
                unread[msg.key()] = signature_to_read(read.get("signature_status"))

    lag = consumer_lag(connection, k.topics.changes, k.consumer_group)
    members: int | None
    instances: dict[str, list[int]] = {}
    producer_role: dict[str, Any] | None = None
    admin = connection.admin()  # held while its futures are pending: they need its thread
    role_group = producer_id(cfg)
    descriptions = admin.describe_consumer_groups([k.consumer_group, role_group], request_timeout=15)
    try:
        group = descriptions[k.consumer_group].result(timeout=30)
        members = len(group.members)
        for member in group.members:
            parts = member.assignment.topic_partitions if member.assignment else []
            instances[member.client_id] = sorted(tp.partition for tp in parts if tp.topic == k.topics.changes)
    except Exception:  # an unknown group, or a broker without the API: not known
        members = None
    try:
        holder, standbys = None, []
        for member in descriptions[role_group].result(timeout=30).members:
            if member.assignment and member.assignment.topic_partitions:
                holder = member.client_id
            else:
                standbys.append(member.client_id)
        since = role_record.get("since_ms") if role_record and role_record.get("instance") == holder else None
        producer_role = {"holder": holder, "since_ms": since, "standbys": sorted(standbys)}
    except Exception:
        producer_role = None

    known = removed = 0
    entries: dict[tuple[int, str], Entry] = {}
    for msg in read_committed(connection, k.topics.state, role="status", settled=False):
        urn = msg.key().decode()
        if urn == SNAPSHOT_KEY:
            continue
        if msg.value() is None:
            entries.pop((msg.partition(), urn), None)
        else:
            entries[(msg.partition(), urn)] = Entry.from_json(msg.value())
    for (_, urn), entry in entries.items():
        if entry.owner and not urn.startswith(FEATURE_URN_PREFIX):  # MLflow objects (a model's features aside)
            known += not entry.removed
            removed += entry.removed

    dead = sum(1 for _ in read_committed(connection, k.topics.dead_letter, role="status", settled=False))

    last = position.last_snapshot if position is not None else None
    complete = last if last is not None and last.get("complete") else None
    if complete is None and position is not None and position.last_snapshot_ms is not None:
        complete = {"id": None, "ended_ms": position.last_snapshot_ms}  # written by an older version
    problems = []
    limit_ms = (2 * cfg.producer.reconcile_interval_seconds + GRACE_SECONDS) * 1000
    if complete is None:
        problems.append("no complete snapshot yet")
    elif now - int(complete.get("ended_ms") or 0) > limit_ms:
        problems.append(f"the last complete snapshot ended more than {limit_ms / 1000:.0f} s ago")
    total = sum(lag.values())
    if total and not members:
        problems.append(f"{total} change events wait and no consumer is in group {k.consumer_group}")
    return Status(
        consumer_lag={"total": total, "partitions": {str(p): n for p, n in sorted(lag.items())}},
        last_complete_snapshot=complete,
        snapshot_running=position.running_snapshot if position is not None else None,
        entities_known=known, entities_removed=removed, dead_letters=dead,
        producer_position=asdict(position) if position is not None else None,
        consumer_members=members, healthy=not problems, problems=problems,
        producer_role=producer_role, instances=instances,
        signatures_unread=sum(unread.values()) if cfg.producer.read_signatures and position is not None else None,
    )
