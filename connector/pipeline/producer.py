"""Producer: MLflow -> change events on the change topic, exactly once.

Events and the producer's own position (snapshot sequence, last complete snapshot, watermarks)
are written in Kafka transactions, so a crash never leaves a position ahead of its events.
On start-up the producer rebuilds what it has already published from the change topic itself
(the latest event of each key) so that an unchanged entity is never published again, except
by a complete snapshot, which re-reads everything (Debezium's READ events) between a
SNAPSHOT_BEGIN and a SNAPSHOT_END marker written to every partition.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.contract.envelope import entity_changed, entity_deleted, fingerprint, snapshot_marker, source_block
from connector.contract.events import SNAPSHOT_MARKER_KEY, ChangeEvent, Entity, EntityKind, kind_of_key
from connector.contract.fitting import fit_event
from connector.errors import ConfigError
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import read_committed
from connector.kafka.topics import CHANGE_EVENT_MAX_BYTES, partition_count
from connector.kafka.transactions import TransactionalWriter
from connector.mlflow.incremental import ChangeSet, Known, Watermarks, read_changes, read_model
from connector.mlflow.listing import full_listing
from connector.mlflow.reader import MlflowReader, MlflowUnavailable
from connector.pipeline.read_ahead import read_ahead

log = logging.getLogger("connector.producer")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Position:
    """The producer's position, stored in the producer-offsets topic."""

    snapshot_seq: int = 0
    last_snapshot_ms: int | None = None
    watermarks: dict[str, int] = field(default_factory=dict)
    partitions: int | None = None  # of the change topic when this position was written

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Position:
        d = json.loads(data)
        return Position(d.get("snapshot_seq", 0), d.get("last_snapshot_ms"), dict(d.get("watermarks") or {}),
                        d.get("partitions"))


@dataclass
class SnapshotSummary:
    snapshot_id: str
    complete: bool
    entities: dict[str, int] = field(default_factory=dict)
    events: int = 0
    deletes: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)
    reason: str | None = None


class ChangeProducer:
    def __init__(self, cfg: ConnectorConfig, reader: MlflowReader) -> None:
        self.cfg = cfg
        self.reader = reader
        k = cfg.kafka
        self.topics = k.topics
        self.connection = KafkaConnection(k)
        self.bootstrap = self.connection.bootstrap
        self.tracking_uri = reader.settings.tracking_uri
        self.registry_uri = reader.settings.registry_uri
        self.position_key = f"position:{cfg.pipeline_name or 'mlflow-datahub'}".encode()
        self.partitions = partition_count(self.connection.admin(), self.topics.changes)
        self.writer = TransactionalWriter(self.connection, f"{k.transactional_id_prefix}-producer", "producer",
                                          {"transaction.timeout.ms": 60000, "linger.ms": 20,
                                           "message.max.bytes": CHANGE_EVENT_MAX_BYTES})
        self.position = Position(partitions=self.partitions)
        self.known = Known()
        self.published = self.known.fingerprints  # key -> fingerprint of the last published state
        self.experiment_names: dict[str, str] = {}
        self.refresh_requests: queue.Queue[str] = queue.Queue()  # registered model names (webhooks)
        self._end_offsets: dict[int, int] = {}
        self._restore()

    # -- start-up --------------------------------------------------------------------------------

    def _restore(self) -> None:
        started = time.monotonic()
        for msg in read_committed(self.connection, self.topics.producer_offsets, role="producer position restore"):
            if msg.key() == self.position_key and msg.value() is not None:
                self.position = Position.from_json(msg.value())
        if self.position.partitions not in (None, self.partitions):
            raise ConfigError(
                f"kafka.topics.changes: {self.topics.changes} has {self.partitions} partitions, but the connector "
                f"wrote it with {self.position.partitions}. A new partition count moves entities between "
                "partitions and their state with them; create new change and state topics and replay instead "
                "(docs/operations.md)")
        self.position.partitions = self.partitions
        events = 0
        for msg in read_committed(self.connection, self.topics.changes, role="producer restore"):
            events += 1
            try:
                event = codec.decode(msg.value())
            except codec.DecodeError:
                continue
            self._remember(event)
        log.info("producer position restored: snapshot %d, %d entities published (%d events read in %.1f s)",
                 self.position.snapshot_seq, len(self.published), events, time.monotonic() - started)

    # -- writing ---------------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is None and msg.key() == SNAPSHOT_MARKER_KEY.encode():
            self._end_offsets[msg.partition()] = msg.offset()

    def _send(self, event: ChangeEvent, partition: int | None = None) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        try:
            event, value, note = fit_event(event, codec.encode, CHANGE_EVENT_MAX_BYTES - 64 * 1024)
        except ValueError as e:
            log.error("%s: not published (%s); its last published state stays in DataHub", event["key"], e)
            return
        if note:
            log.warning("%s", note)
        self.writer.produce(self.topics.changes, event["key"].encode(), value, on_delivery=self._on_delivery, **kwargs)

    def _commit(self, events: Iterable[tuple[ChangeEvent, int | None]], position: Position | None = None) -> None:
        """One transaction: the events, then (optionally) the new position."""
        batch = list(events)

        def fill(writer: TransactionalWriter) -> None:
            for event, partition in batch:
                self._send(event, partition)
            if position is not None:
                writer.produce(self.topics.producer_offsets, self.position_key, position.to_json())

        self.writer.transaction_with_retry(fill, f"transaction of {len(batch)} events")
        for event, _ in batch:
            self._remember(event)
        if position is not None:
            self.position = position

    def _remember(self, event: ChangeEvent) -> None:
        if event["kind"] == "SNAPSHOT":
            return
        self.known.remember(event["kind"], event["key"], event["after"])  # type: ignore[arg-type]
        if event["kind"] == "EXPERIMENT" and event["after"] is not None:
            after = event["after"]
            self.experiment_names[after["experiment_id"]] = after["name"]  # type: ignore[typeddict-item]

    def _markers(self, op: str, snapshot_id: str, read_at: int, complete: bool = False,
                 entities: int = 0) -> list[tuple[ChangeEvent, int | None]]:
        source = source_block(self.tracking_uri, self.registry_uri, read_at, snapshot_id)
        return [(snapshot_marker(op, snapshot_id, self.partitions, source, now_ms(), complete, entities), p)  # type: ignore[arg-type]
                for p in range(self.partitions)]

    # -- a complete snapshot ---------------------------------------------------------------------

    def snapshot(self, stop: threading.Event | None = None) -> SnapshotSummary:
        """Read all of MLflow; publish every entity as READ between markers on every partition;
        publish DELETE for what was published before and is gone. An interrupted or failed listing
        ends with an incomplete marker and deletes nothing."""
        seq = self.position.snapshot_seq + 1
        started = now_ms()
        snapshot_id = f"{seq}-{started}"
        summary = SnapshotSummary(snapshot_id, complete=False)
        self._end_offsets = {}
        self._commit(self._markers("SNAPSHOT_BEGIN", snapshot_id, started),
                     Position(seq, self.position.last_snapshot_ms, self.position.watermarks, self.partitions))
        log.info("snapshot %s started", snapshot_id)
        seen: set[str] = set()
        batch: list[tuple[ChangeEvent, int | None]] = []
        marks = Watermarks()

        def flush() -> None:
            self._commit(batch)
            summary.events += len(batch)
            batch.clear()

        try:
            with closing(read_ahead(full_listing(self.reader))) as listing:
                for item in listing:
                    if stop is not None and stop.is_set():
                        raise InterruptedError("stopped")
                    if item is None:  # MLflow is still answering: what is read so far goes out now
                        if batch:
                            flush()
                        continue
                    kind, entity = item
                    marks = marks.advanced(_watermark_of(kind, entity))
                    event = entity_changed("READ", kind, entity,
                                           source_block(self.tracking_uri, self.registry_uri, now_ms(), snapshot_id),
                                           now_ms())
                    seen.add(event["key"])
                    summary.entities[kind] = summary.entities.get(kind, 0) + 1
                    batch.append((event, None))
                    if len(batch) >= self.cfg.producer.transaction_size:
                        flush()
            summary.complete = True
        except (MlflowUnavailable, InterruptedError) as e:
            summary.reason = str(e)
            log.warning("snapshot %s incomplete: %s; nothing will be deleted for it", snapshot_id, e)
        deletes: list[tuple[ChangeEvent, int | None]] = []
        if summary.complete:
            deletes = self._deletes(seen, snapshot_id, summary)
            if not summary.complete:
                marks = Watermarks()  # nothing is taken from a listing that the fail-safe refused
        total = sum(summary.entities.values())
        final = batch + deletes + self._markers("SNAPSHOT_END", snapshot_id, now_ms(), summary.complete, total)
        watermarks = Watermarks.from_dict(self.position.watermarks)
        if summary.complete:
            watermarks = watermarks.advanced(marks)
        # A listing that failed is retried at the next cycle; one blocked by the fail-safe threshold
        # (it listed fine, but too much is gone) waits for the next reconciliation like a complete one.
        blocked = summary.reason is not None and "fail_safe_threshold" in summary.reason
        position = Position(seq, started if summary.complete or blocked else self.position.last_snapshot_ms,
                            watermarks.to_dict(), self.partitions)
        self._commit(final, position)
        summary.events += len(batch) + len(deletes)
        summary.deletes = len(deletes)
        summary.end_offsets = dict(self._end_offsets)
        log.info("snapshot %s %s: %d entities (%s), %d deletes", snapshot_id,
                 "complete" if summary.complete else "INCOMPLETE", total,
                 ", ".join(f"{v} {k.lower()}" for k, v in summary.entities.items()), len(deletes))
        return summary

    def _deletes(self, seen: set[str], snapshot_id: str, summary: SnapshotSummary
                 ) -> list[tuple[ChangeEvent, int | None]]:
        gone = sorted(set(self.published) - seen)
        if not gone:
            return []
        stateful = self.cfg.stateful
        percent = 100.0 * len(gone) / max(len(self.published), 1)
        if percent > stateful.fail_safe_threshold:
            summary.complete = False
            summary.reason = (f"{len(gone)} of {len(self.published)} entities ({percent:.0f}%) are gone, above "
                              f"fail_safe_threshold {stateful.fail_safe_threshold:.0f}%: treated as a failed listing")
            log.warning("snapshot %s: %s", snapshot_id, summary.reason)
            return []
        source = source_block(self.tracking_uri, self.registry_uri, now_ms(), snapshot_id)
        return [(entity_deleted(key, kind_of_key(key), source, now_ms()), None) for key in gone]

    # -- change cycles ---------------------------------------------------------------------------

    def publish_changes(self, entities: Iterable[tuple[EntityKind, Entity]], deleted_keys: Iterable[str] = (),
                        position: Position | None = None) -> int:
        """Publish the entities whose state differs from what was last published, and the DELETE of
        published keys that are gone; the new position (if any) commits with the last batch."""
        batch: list[tuple[ChangeEvent, int | None]] = []
        count = 0
        source = source_block(self.tracking_uri, self.registry_uri, now_ms())
        for key in deleted_keys:
            if key in self.published:
                batch.append((entity_deleted(key, kind_of_key(key), source, now_ms()), None))
        for kind, entity in entities:
            event = entity_changed("UPDATE", kind, entity,
                                   source_block(self.tracking_uri, self.registry_uri, now_ms()), now_ms())
            previous = self.published.get(event["key"])
            if previous == fingerprint(entity):
                continue
            if previous is None:
                event["op"] = "CREATE"
            batch.append((event, None))
            if len(batch) >= self.cfg.producer.transaction_size:
                self._commit(batch)
                count += len(batch)
                batch = []
        if batch or position is not None:
            self._commit(batch, position)
            count += len(batch)
        return count

    def cycle(self) -> int:
        """One incremental cycle: what changed since the watermarks, published with the new ones."""
        marks = Watermarks.from_dict(self.position.watermarks)
        changes = read_changes(self.reader, marks, self.known,
                               int(self.cfg.producer.watermark_overlap_seconds * 1000))
        position = Position(self.position.snapshot_seq, self.position.last_snapshot_ms,
                            marks.advanced(changes.watermarks).to_dict(), self.partitions)
        return self._publish(changes, position)

    def refresh_model(self, names: Iterable[str]) -> int:
        """Targeted reads of registered models a webhook named; published like any change."""
        changes = ChangeSet()
        for name in sorted(set(names)):
            one = read_model(self.reader, self.known, self.experiment_names, name)
            changes.entities += one.entities
            changes.deleted_keys += one.deleted_keys
        return self._publish(changes, None)

    def _publish(self, changes: ChangeSet, position: Position | None) -> int:
        published = self.publish_changes(changes.entities, changes.deleted_keys, position)
        if published:
            kinds: dict[str, int] = {}
            for kind, _ in changes.entities:
                kinds[kind] = kinds.get(kind, 0) + 1
            log.info("published %d changed entities (of %d read: %s; %d gone)", published,
                     len(changes.entities), ", ".join(f"{n} {k.lower()}" for k, n in sorted(kinds.items())),
                     len([k for k in changes.deleted_keys if k]))
        return published

    def snapshot_due(self) -> bool:
        last = self.position.last_snapshot_ms
        return last is None or now_ms() - last >= self.cfg.producer.reconcile_interval_seconds * 1000

    def run(self, stop: threading.Event) -> None:
        """Until stopped: a complete snapshot when one is due, else an incremental cycle, one every
        `poll_interval_seconds` counted from the start of the last (a cycle that takes longer is
        followed at once); in between, targeted reads of what webhooks report, as they arrive."""
        poll = self.cfg.producer.poll_interval_seconds
        log.info("producer reading %s every %.0f s (complete snapshot every %.0f s) into %s",
                 self.tracking_uri, poll, self.cfg.producer.reconcile_interval_seconds, self.topics.changes)
        while not stop.is_set():
            started = time.monotonic()
            try:
                if self.snapshot_due():
                    self.snapshot(stop)
                else:
                    self.cycle()
            except MlflowUnavailable as e:
                log.warning("producer: %s; next attempt in %.0f s", e, poll)
                started = time.monotonic()  # after a failure, a whole interval before the next attempt
            deadline = started + poll
            while not stop.is_set():
                self._refresh_reported(timeout=min(0.2, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    break

    def _refresh_reported(self, timeout: float) -> None:
        """The targeted reads webhooks asked for: all those waiting, after up to `timeout` seconds for
        the first (none: only those already waiting)."""
        try:
            names = [self.refresh_requests.get(timeout=timeout) if timeout > 0
                     else self.refresh_requests.get_nowait()]
        except queue.Empty:
            return
        while not self.refresh_requests.empty():
            names.append(self.refresh_requests.get_nowait())
        try:
            self.refresh_model(names)
        except MlflowUnavailable as e:
            log.warning("producer: targeted read of %s failed (%s); the next cycle covers it", names, e)

    def close(self) -> None:
        self.writer.flush(30)


def _watermark_of(kind: EntityKind, entity: Entity) -> Watermarks:
    if kind == "EXPERIMENT":
        return Watermarks(experiments=entity["last_update_time"])  # type: ignore[typeddict-item]
    if kind == "REGISTERED_MODEL":
        return Watermarks(registered_models=entity["last_updated_timestamp"])  # type: ignore[typeddict-item]
    if kind == "MODEL_VERSION":
        return Watermarks(model_versions=entity["last_updated_timestamp"])  # type: ignore[typeddict-item]
    if kind == "LOGGED_MODEL":
        return Watermarks(logged_models=entity["last_updated_timestamp"])  # type: ignore[typeddict-item]
    return Watermarks(runs=entity["start_time"])  # type: ignore[typeddict-item]
