"""Producer: MLflow -> change events on the change topic, exactly once.

Events and the producer's own position (snapshot sequence, last snapshot, watermarks) are written
in Kafka transactions, so a crash never leaves a position ahead of its events. With them goes a
small summary of each entity whose published state changed (its fingerprint and what the joins
need), in the same compacted producer-offsets topic: on start-up the producer reads the position
and the summaries, not the change topic's history, so an unchanged entity is never published again,
except by a complete snapshot, which re-reads everything (Debezium's READ events) between a
SNAPSHOT_BEGIN and a SNAPSHOT_END marker written to every partition.

A snapshot reads no model version's artifacts: the versions it met with a signature never read are
read after it by the features pass (`FeaturesPass`), a few registered models at a time, between the
cycles of `run` (or at the end of the `snapshot` command), and published again with their features.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import KafkaError, Message

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.contract.envelope import entity_changed, entity_deleted, fingerprint, snapshot_marker, source_block
from connector.contract.events import (
    SNAPSHOT_MARKER_KEY,
    ChangeEvent,
    Entity,
    EntityKind,
    entity_key,
    kind_of_key,
    model_version_key,
)
from connector.contract.fitting import fit_event
from connector.errors import ConfigError
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import read_committed
from connector.kafka.topics import CHANGE_EVENT_MAX_BYTES, partition_count
from connector.kafka.transactions import TransactionalWriter
from connector.mlflow.confirm import confirm_gone
from connector.mlflow.incremental import ChangeSet, Known, Watermarks, read_changes, read_model, read_models
from connector.mlflow.listing import full_listing
from connector.mlflow.reader import READ_FAILURES, AuthenticationFailed, MlflowReader, MlflowUnavailable, failure
from connector.mlflow.scope import Scope
from connector.mlflow.signatures import Signatures
from connector.observability.http import HEARTBEATS
from connector.observability.metrics import METRICS
from connector.observability.progress import SnapshotProgress
from connector.pipeline.position import (
    Position,
    identity,
    identity_mismatch,
    known_key,
    known_prefix,
    legacy_position_key,
    normalized_uri,
    position_key,
    producer_id,
)
from connector.pipeline.read_ahead import read_ahead

log = logging.getLogger("connector.producer")

# Failures of MLflow (connector/mlflow/reader.py READ_FAILURES) never end `run`: what failed is tried
# again after a backoff, from the poll interval doubling up to this.
BACKOFF_MAX_SECONDS = 60.0
# Each request of a cycle is retried this long (a snapshot's, until MLflow answers); then the cycle fails
# and is tried again after a backoff: a request MLflow keeps failing holds up no targeted read, nor a stop.
CYCLE_RETRY_SECONDS = 60.0
TARGETED_READ_RETRY_SECONDS = 10.0  # each request of a targeted read: retried this long, then the read waits
TARGETED_READ_ATTEMPTS = 3  # failed targeted reads of one model (MLflow answering others) before it is skipped
# Model versions whose signature one step of the features pass reads (an artifact request each: under a second of
# MLflow's time at ~25 ms a request): between two steps, `run` serves webhooks and keeps its cycles on time.
FEATURE_READS_PER_STEP = 25
# The `snapshot` command's features pass serves no webhook: larger steps, fewer requests for the models and runs.
FEATURE_READS_PER_COMMAND_STEP = 200
FEATURES_PROGRESS_SECONDS = 10.0  # a progress line of a long features pass at most this often


def now_ms() -> int:
    return int(time.time() * 1000)


class NotPublished(Exception):
    """Entities of a snapshot that could not be published: the snapshot cannot count as complete."""


@dataclass
class SnapshotSummary:
    snapshot_id: str
    complete: bool
    entities: dict[str, int] = field(default_factory=dict)
    events: int = 0
    deletes: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)
    reason: str | None = None
    # Model versions met with a signature never read: the features pass after the snapshot reads them.
    signatures_unread: int = 0


@dataclass
class FeaturesPass:
    """The model versions found with a signature never read (by a snapshot, which reads none, or at
    start-up), by registered model: read after it, a step at a time, and published with their features."""

    due: dict[str, list[str]]  # registered model name -> its versions to read
    after: str  # what found them: "snapshot <id>" or "start-up"
    versions: int = 0  # to read, when it was made
    read: int = 0  # read so far
    started: float | None = None  # monotonic, at its first step
    logged: float = 0.0  # monotonic, its last progress line
    failures: int = 0  # steps failed in a row
    next_at: float = 0.0  # monotonic: no step before (a backoff after a failure)
    warnings: Counter[str] = field(default_factory=Counter)  # read without features, by status
    lines_logged: int = 0  # warning lines of versions without features
    reason: str | None = None  # why it ended before all were read (the `snapshot` command)

    @property
    def remaining(self) -> int:
        return sum(len(versions) for versions in self.due.values())

    def next_step(self, limit: int) -> list[tuple[str, str]]:
        """The (model, version) pairs of the next step: at most `limit`, in the order they are due. Pure."""
        picked: list[tuple[str, str]] = []
        for name, versions in self.due.items():
            picked += [(name, v) for v in versions[:limit - len(picked)]]
            if len(picked) >= limit:
                break
        return picked

    def done(self, step: list[tuple[str, str]]) -> None:
        """The versions of a step were read (or tried: one that got no answer waits for the next pass)."""
        for name, version in step:
            versions = self.due.get(name)
            if versions is not None and version in versions:
                versions.remove(version)
                if not versions:
                    del self.due[name]

    def seconds(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started


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
        self.position_key = position_key(cfg)
        self.partitions = partition_count(self.connection.admin(), self.topics.changes)
        # What this pipeline reads, as the configuration says (a reader of another address, as a test's dead
        # MLflow, is an outage of this MLflow, not another MLflow).
        self.identity = identity(cfg, cfg.mlflow.resolved_tracking_uri(), cfg.mlflow.resolved_registry_uri())
        self.writer = TransactionalWriter(self.connection, producer_id(cfg), "producer",
                                          {"transaction.timeout.ms": 60000, "linger.ms": 20,
                                           "message.max.bytes": CHANGE_EVENT_MAX_BYTES})
        self.position = Position(partitions=self.partitions)
        self.known = Known()
        self.published = self.known.fingerprints  # key -> fingerprint of the last published state
        # Read once per model version ever (kept in `known`).
        self.signatures = Signatures(reader, self.known, enabled=cfg.producer.read_signatures)
        self.experiment_names: dict[str, str] = {}
        self.refresh_requests: queue.Queue[str] = queue.Queue()  # registered model names (webhooks)
        self.skipped_objects = 0  # targeted reads given up after failing again and again (for metrics)
        self._read_failures: dict[str, int] = {}  # registered model name -> its targeted reads failed in a row
        self._read_again_at: dict[str, float] = {}  # registered model name -> when its failed read is due again
        self.scope = Scope.of(cfg)
        self.live_progress: bool | None = None  # a live display of the first snapshot: None = on a terminal
        self._end_offsets: dict[int, int] = {}
        self.written_offsets: dict[int, int] = {}  # partition -> offset of the last change event acknowledged
        self.features: FeaturesPass | None = None  # signatures read after a snapshot (or start-up)
        self._unpublished: set[str] = set()  # keys whose latest event could not be published
        self._last_skew_read = float("-inf")  # when a cycle last looked back max_clock_skew_seconds
        # Webhook requests read from Kafka by the holder of the producer role (connector.pipeline.producer_role):
        # `requests_read()` is the offset up to which they are on `refresh_requests`; the offset up to which
        # they were applied goes into the position.
        self.requests_read: Callable[[], int | None] | None = None
        self.requests_offset: int | None = None
        self._restore()
        self.requests_offset: int | None = self.position.requests_offset
        self._plan_features("start-up")  # what an earlier process (or holder of the role) had not read yet

    # -- start-up --------------------------------------------------------------------------------

    def _restore(self) -> None:
        """The position and what was published, from the producer-offsets topic: one compacted record
        per entity (its summary), so a restart costs the same after one snapshot or after hundreds.
        A change topic written by an earlier version without summaries is read once instead."""
        started = time.monotonic()
        prefix = known_prefix(self.cfg)
        legacy_key = legacy_position_key(self.cfg)
        summaries = 0
        found = legacy = False
        for msg in read_committed(self.connection, self.topics.producer_offsets, role="producer position restore"):
            key = msg.key() or b""
            if key == self.position_key:
                found = msg.value() is not None
                self.position = Position.from_json(msg.value()) if found else Position(partitions=self.partitions)
            elif key.startswith(prefix):
                entity_key = key[len(prefix):].decode()
                summary = json.loads(msg.value()) if msg.value() is not None else None
                self._restore_summary(entity_key, summary)
                summaries += 1
            elif key == legacy_key:
                legacy = msg.value() is not None
        mismatch = identity_mismatch(self.position.identity, self.identity)
        if mismatch is not None:
            raise self._foreign(f"its position in {self.topics.producer_offsets} says so ({mismatch})")
        if self.position.partitions not in (None, self.partitions):
            raise ConfigError(
                f"kafka.topics.changes: {self.topics.changes} has {self.partitions} partitions, but the connector "
                f"wrote it with {self.position.partitions}. A new partition count moves entities between "
                "partitions and their state with them; create new change and state topics and replay instead "
                "(docs/operations.md)")
        self.position.partitions = self.partitions
        if not found:
            if legacy:
                log.info("a position written by an earlier version under %r is not taken: it does not say which "
                         "MLflow and change topic it belongs to (pipelines on one Kafka shared it); what was "
                         "published is read from %s itself, and a complete snapshot starts", legacy_key.decode(),
                         self.topics.changes)
            self._restore_from_change_topic()
        elif not self.position.known_summaries and self.position.snapshot_seq > 0:
            self._restore_from_change_topic()
        self.position.known_summaries = True
        self.position.identity = self.identity
        log.info("producer position restored: snapshot %d, %d entities published (%d records read in %.1f s)",
                 self.position.snapshot_seq, len(self.published), summaries, time.monotonic() - started)

    def _foreign(self, evidence: str) -> ConfigError:
        """The error of a change topic that holds another MLflow's changes: never read as this one's."""
        return ConfigError(
            f"kafka.topics.changes: {self.topics.changes} holds the changes of another MLflow than "
            f"{self.identity['tracking_uri']}: {evidence}. Its entities would be taken for gone from this one. "
            "Give each MLflow server its own pipeline: its own pipeline_name, kafka.topics (changes, state), "
            "kafka.consumer_group and kafka.transactional_id_prefix (docs/operations.md, Deployment)")

    def _restore_summary(self, key: str, summary: dict[str, Any] | None) -> None:
        kind = kind_of_key(key)
        self.known.restore(kind, key, summary)
        if kind == "EXPERIMENT":
            experiment_id = key.split(":", 1)[1]
            if summary is None:
                self.experiment_names.pop(experiment_id, None)
            else:
                self.experiment_names[experiment_id] = summary["name"]

    def _restore_from_change_topic(self) -> None:
        """Once, after an upgrade: what was published, from the change topic itself, made into the
        summaries a normal start reads; then written, so that the next start reads those."""
        events = 0
        summaries: dict[str, dict[str, Any] | None] = {}
        sources: dict[str, str] = {}  # key -> the tracking URI of its latest event
        for msg in read_committed(self.connection, self.topics.changes, role="producer restore"):
            events += 1
            try:
                event = codec.decode(msg.value())
            except codec.DecodeError:
                continue
            if event["kind"] != "SNAPSHOT":
                after = event["after"]
                summaries[event["key"]] = None if after is None else Known.summary(event["kind"], after)  # type: ignore[arg-type]
                sources[event["key"]] = normalized_uri(event["source"]["tracking_uri"])
        foreign = sorted({uri for key, uri in sources.items() if summaries[key] is not None}
                         - {self.identity["tracking_uri"]})
        if foreign:
            raise self._foreign(f"its events were read from {', '.join(foreign[:3])}")
        present = {key: summary for key, summary in summaries.items() if summary is not None}
        for key, summary in summaries.items():
            self._restore_summary(key, summary)
        if events:
            log.info("no summaries of published entities yet: %d change events read; writing %d summaries", events,
                     len(present))
        keys = sorted(present)
        for start in range(0, len(keys), 5000):
            chunk = keys[start:start + 5000]

            def fill(writer: TransactionalWriter, chunk: list[str] = chunk) -> None:
                for key in chunk:
                    writer.produce(self.topics.producer_offsets, known_key(self.cfg, key),
                                   json.dumps(present[key]).encode())

            self.writer.transaction_with_retry(fill, f"{len(chunk)} summaries")

    # -- writing ---------------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is None:
            self.written_offsets[msg.partition()] = msg.offset()  # delivery reports come in order per partition
            if msg.key() == SNAPSHOT_MARKER_KEY.encode():
                self._end_offsets[msg.partition()] = msg.offset()

    def _send(self, event: ChangeEvent, partition: int | None = None) -> bool:
        """Queue the event (fitted to the topic's size); False when it cannot be published at all."""
        kwargs = {} if partition is None else {"partition": partition}
        try:
            event, value, note = fit_event(event, codec.encode, CHANGE_EVENT_MAX_BYTES - 64 * 1024)
        except ValueError as e:
            log.error("%s: not published (%s); its last published state stays in DataHub", event["key"], e)
            self._unpublished.add(event["key"])
            return False
        if note:
            log.warning("%s", note)
        self.writer.produce(self.topics.changes, event["key"].encode(), value, on_delivery=self._on_delivery, **kwargs)
        return True

    def _summary_write(self, writer: TransactionalWriter, event: ChangeEvent) -> dict[str, Any] | None:
        """The entity's summary into the producer-offsets topic, when it differs from the one there.
        Returns the summary (None for a DELETE), made once for both the topic and `Known`."""
        key = event["key"]
        if event["after"] is None:
            if key in self.published:
                writer.produce(self.topics.producer_offsets, known_key(self.cfg, key), None)
            return None
        summary = Known.summary(event["kind"], event["after"])
        if self.published.get(key) != summary["fp"]:
            writer.produce(self.topics.producer_offsets, known_key(self.cfg, key), json.dumps(summary).encode())
        return summary

    def _commit(self, events: Iterable[tuple[ChangeEvent, int | None]], position: Position | None = None) -> None:
        """One transaction: the events, then (optionally) the new position. Once it is committed, what it
        published is what `Known` holds (an event that could not be published at all leaves it as it was)."""
        batch = list(events)
        published: dict[str, dict[str, Any] | None] = {}  # key -> summary of its last event in the batch

        def fill(writer: TransactionalWriter) -> None:
            published.clear()
            for event, partition in batch:
                if self._send(event, partition) and event["kind"] != "SNAPSHOT":
                    published[event["key"]] = self._summary_write(writer, event)
            if position is not None:
                writer.produce(self.topics.producer_offsets, self.position_key, position.to_json())

        if position is not None:
            position = replace(position, identity=self.identity, requests_offset=self.requests_offset)
        self.writer.transaction_with_retry(fill, f"transaction of {len(batch)} events")
        METRICS.produced((event["kind"], event["op"]) for event, _ in batch)
        for key, summary in published.items():
            if key not in self._unpublished:
                self._restore_summary(key, summary)
        if position is not None:
            self.position = position

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
        if stop is not None:
            self.reader.stopping = stop  # a stop ends a wait on MLflow at once
        seq = self.position.snapshot_seq + 1
        started = now_ms()
        snapshot_id = f"{seq}-{started}"
        summary = SnapshotSummary(snapshot_id, complete=False)
        self._end_offsets = {}
        self._commit(self._markers("SNAPSHOT_BEGIN", snapshot_id, started),
                     replace(self.position, snapshot_seq=seq, partitions=self.partitions, running_snapshot=snapshot_id))
        log.info("snapshot %s started", snapshot_id)
        self._unpublished.clear()
        self.signatures.begin()
        progress = SnapshotProgress(snapshot_id, live=self.live_progress)
        self.live_progress = False  # a live display for the first snapshot only; later ones log their progress
        seen: set[str] = set()
        batch: list[tuple[ChangeEvent, int | None]] = []
        marks = Watermarks()

        def flush() -> None:
            self._commit(batch)
            summary.events += len(batch)
            batch.clear()

        try:
            with closing(read_ahead(full_listing(self.reader, progress, self.signatures))) as listing:
                for item in listing:
                    HEARTBEATS.beat("producer")
                    if stop is not None and stop.is_set():
                        raise InterruptedError("stopped")
                    if item is None:  # MLflow is still answering: what is read so far goes out now
                        if batch:
                            flush()
                        continue
                    kind, entity = item
                    marks.include(kind, entity)
                    if not self.scope.includes(kind, entity, started, self.experiment_names):
                        continue  # never published; if it was before, it is stale (see _deletes)
                    event = entity_changed("READ", kind, entity,
                                           source_block(self.tracking_uri, self.registry_uri, now_ms(), snapshot_id),
                                           now_ms())
                    seen.add(event["key"])
                    summary.entities[kind] = summary.entities.get(kind, 0) + 1
                    progress.advance(kind)
                    batch.append((event, None))
                    if len(batch) >= self.cfg.producer.transaction_size:
                        flush()
            if self._unpublished & seen:
                raise NotPublished(f"{len(self._unpublished & seen)} entities could not be published "
                                        f"(e.g. {sorted(self._unpublished & seen)[0]})")
            summary.complete = True
        except (MlflowUnavailable, InterruptedError, NotPublished) as e:
            summary.reason = str(e)
            log.warning("snapshot %s incomplete: %s; nothing will be deleted for it", snapshot_id, e)
        finally:
            progress.close()
        deletes: list[tuple[ChangeEvent, int | None]] = []
        if summary.complete:
            deletes = self._deletes(seen, snapshot_id, summary)
            if not summary.complete:
                marks = Watermarks()  # nothing is taken from a listing that the fail-safe refused
        total = sum(summary.entities.values())
        final = batch + deletes + self._markers("SNAPSHOT_END", snapshot_id, now_ms(), summary.complete, total)
        watermarks = Watermarks.from_dict(self.position.watermarks)
        if summary.complete:
            # A run's start_time is its client's clock: the watermark never passes this producer's.
            watermarks = watermarks.advanced(replace(marks, runs=min(marks.runs, started) if marks.runs else None))
        # A listing that failed is retried at the next cycle; one blocked by the fail-safe threshold
        # (it listed fine, but too much is gone) waits for the next reconciliation like a complete one.
        blocked = summary.reason is not None and "fail_safe_threshold" in summary.reason
        summary.deletes = sum(1 for event, _ in deletes if event["op"] == "DELETE")
        ended = now_ms()
        position = Position(seq, started if summary.complete or blocked else self.position.last_snapshot_ms,
                            watermarks.to_dict(), self.partitions, None,
                            {"id": snapshot_id, "complete": summary.complete, "ended_ms": ended,
                             "seconds": round((ended - started) / 1000, 3), "entities": dict(summary.entities),
                             "deletes": summary.deletes, "reason": summary.reason}, known_summaries=True)
        self._commit(final, position)
        METRICS.snapshot_ended(summary.complete, (ended - started) / 1000)
        summary.events += len(batch) + len(deletes)
        summary.end_offsets = dict(self._end_offsets)
        self._plan_features(f"snapshot {snapshot_id}")
        summary.signatures_unread = self.features.remaining if self.features is not None else 0
        log.info("snapshot %s %s: %d entities (%s), %d deletes%s", snapshot_id,
                 "complete" if summary.complete else "INCOMPLETE", total,
                 ", ".join(f"{v} {k.lower()}" for k, v in summary.entities.items()), summary.deletes,
                 f"; {summary.signatures_unread} model versions' signatures to read after it"
                 if summary.signatures_unread else "")
        return summary

    # -- the features pass: signatures a snapshot met unread ---------------------------------------

    def _plan_features(self, after: str) -> None:
        """The features pass: the registered models with published versions whose signature was never
        read (or not for want of an answer); each is read once in this pass."""
        due = self.signatures.unread_models()
        self.features = FeaturesPass(due, after, versions=sum(len(v) for v in due.values())) if due else None
        METRICS.signatures_unread.set(self.features.remaining if self.features is not None else 0)

    def features_step(self, limit: int = FEATURE_READS_PER_STEP) -> None:
        """One step of the features pass: the next `limit` versions due, their registered models
        read with all their versions (one artifact request for each version of the step) and published.
        Raises READ_FAILURES: those versions stay due."""
        p = self.features
        if p is None:
            return
        if p.started is None:
            p.started = p.logged = time.monotonic()
            log.info("features: reading the signatures of %d model versions of %d registered models, never read "
                     "(found by %s), %d at a time", p.versions, len(p.due), p.after, limit)
        step = p.next_step(limit)
        before = Counter(self.signatures.warnings)
        self.signatures.lines_logged = p.lines_logged  # the pass's warning lines are limited as one pass
        self.signatures.only = {model_version_key(name, version) for name, version in step}
        try:
            with self.reader.retrying_for(CYCLE_RETRY_SECONDS):
                changes = read_models(self.reader, self.known, self.experiment_names, {n for n, _ in step},
                                      self.signatures)
        finally:
            p.lines_logged = self.signatures.lines_logged
            self.signatures.only = None
        self.publish_changes(changes.entities, changes.deleted_keys)
        p.warnings.update(self.signatures.warnings - before)
        p.done(step)
        p.read += len(step)
        p.failures = 0
        METRICS.signatures_unread.set(p.remaining)
        if not p.due:
            self.features = None
            log.info("features: %d model versions read in %.1f s (found by %s)%s", p.read, p.seconds(), p.after,
                     "; without features: " + ", ".join(f"{n} {k.lower()}" for k, n in sorted(p.warnings.items()))
                     if p.warnings else "")
        elif time.monotonic() - p.logged >= FEATURES_PROGRESS_SECONDS:
            p.logged = time.monotonic()
            log.info("features: %d of %d model versions read (%.0f s)", p.read, p.versions, p.seconds())

    def read_features(self, stop: threading.Event | None = None) -> FeaturesPass | None:
        """The whole features pass at once (the `snapshot` command, after its snapshot). When MLflow fails
        a step, the pass ends there with its reason; what it did not read is read by the next `run` or
        snapshot. Returns the pass (None: nothing was due)."""
        p = self.features
        while self.features is not None and not (stop is not None and stop.is_set()):
            try:
                self.features_step(FEATURE_READS_PER_COMMAND_STEP)
            except READ_FAILURES as e:
                assert p is not None
                p.reason = failure(e, self.tracking_uri)
                log.warning("features: the signatures of %d model versions not read (%s); the next run or snapshot "
                            "reads them", p.remaining, p.reason)
                self.features = None
        return p

    def _features_due(self) -> bool:
        return self.features is not None and time.monotonic() >= self.features.next_at

    def _features_step_or_backoff(self) -> None:
        """A step of the features pass in `run`; a failure is logged and the step tried again after a backoff."""
        p = self.features
        assert p is not None
        try:
            self.features_step()
        except READ_FAILURES as e:
            p.failures += 1
            wait = self._backoff(p.failures)
            p.next_at = time.monotonic() + wait
            log.log(logging.ERROR if isinstance(e, AuthenticationFailed) else logging.WARNING,
                    "producer: reading features failed %d time%s in a row (%s); next attempt in %.3g s", p.failures,
                    "" if p.failures == 1 else "s", failure(e, self.tracking_uri), wait)

    def _deletes(self, seen: set[str], snapshot_id: str, summary: SnapshotSummary
                 ) -> list[tuple[ChangeEvent, int | None]]:
        """DELETE events for what was published before and is confirmed gone, and READ events (of this
        snapshot) for what the listing missed although MLflow still has it (see connector/mlflow/confirm.py)."""
        candidates = sorted(set(self.published) - seen)
        if not candidates:
            return []
        stateful = self.cfg.stateful
        percent = 100.0 * len(candidates) / max(len(self.published), 1)
        if percent > stateful.fail_safe_threshold:
            summary.complete = False
            summary.reason = (f"{len(candidates)} of {len(self.published)} entities ({percent:.0f}%) are gone, above "
                              f"fail_safe_threshold {stateful.fail_safe_threshold:.0f}%: treated as a failed listing")
            log.warning("snapshot %s: %s", snapshot_id, summary.reason)
            return []
        try:
            confirmed = confirm_gone(self.reader, self.known, self.experiment_names, candidates)
        except MlflowUnavailable as e:
            summary.complete = False
            summary.reason = f"the {len(candidates)} entities the listing did not return could not be checked: {e}"
            log.warning("snapshot %s incomplete: %s; nothing will be deleted for it", snapshot_id, summary.reason)
            return []
        source = source_block(self.tracking_uri, self.registry_uri, now_ms(), snapshot_id)
        in_scope = [(kind, entity) for kind, entity in confirmed.alive
                    if self.scope.includes(kind, entity, now_ms(), self.experiment_names)]
        confirmed.gone += [entity_key(kind, entity) for kind, entity in confirmed.alive
                           if (kind, entity) not in in_scope and entity_key(kind, entity) in candidates]
        again = [(entity_changed("READ", kind, entity, source, now_ms()), None) for kind, entity in in_scope]
        missed = sorted({event["key"] for event, _ in again} & set(candidates))
        if missed:
            log.info("snapshot %s: the listing missed %d entities that MLflow still has (its pages shifted while it "
                     "was read), e.g. %s: published again, not deleted", snapshot_id, len(missed), missed[0])
        for event, _ in again:
            summary.entities[event["kind"]] = summary.entities.get(event["kind"], 0) + (event["key"] not in seen)
            seen.add(event["key"])
        return again + [(entity_deleted(key, kind_of_key(key), source, now_ms()), None) for key in confirmed.gone]

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
            if not self.scope.includes(kind, entity, now_ms(), self.experiment_names):
                key = entity_key(kind, entity)
                if key in self.published:  # it left the scope: stale, as if gone
                    batch.append((entity_deleted(key, kind, source, now_ms()), None))
                continue
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
        settings = self.cfg.producer
        skew_due = time.monotonic() - self._last_skew_read >= settings.clock_skew_check_seconds
        self.signatures.begin()
        changes = read_changes(self.reader, marks, self.known, int(settings.watermark_overlap_seconds * 1000),
                               now_ms(), int(settings.max_clock_skew_seconds * 1000) if skew_due else 0,
                               self.signatures)
        if skew_due:
            self._last_skew_read = time.monotonic()
        position = replace(self.position, watermarks=marks.advanced(changes.watermarks).to_dict(),
                           partitions=self.partitions)
        return self._publish(changes, position)

    def refresh_model(self, names: Iterable[str]) -> int:
        """Targeted reads of registered models a webhook named; published like any change."""
        changes = ChangeSet()
        for name in sorted(set(names)):
            one = read_model(self.reader, self.known, self.experiment_names, name, self.signatures)
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
        followed at once); in between, targeted reads of what webhooks report, as they arrive, and the
        steps of a features pass (the signatures a snapshot met unread).

        No failure of MLflow ends it: a cycle that fails, or a snapshot left incomplete, is logged in
        one line and tried again after a backoff (the poll interval, doubled at each failure in a row,
        up to BACKOFF_MAX_SECONDS); Kafka's errors and the connector's own still end it."""
        poll = self.cfg.producer.poll_interval_seconds
        log.info("producer reading %s every %.0f s (complete snapshot every %.0f s) into %s",
                 self.tracking_uri, poll, self.cfg.producer.reconcile_interval_seconds, self.topics.changes)
        failures = 0  # cycles or snapshots failed in a row
        self.reader.on_wait = lambda: HEARTBEATS.beat("producer")
        self.reader.stopping = stop  # a stop ends a wait on MLflow at once
        while not stop.is_set():
            HEARTBEATS.beat("producer")
            started = time.monotonic()
            what = "snapshot" if self.snapshot_due() else "cycle"
            reason, level = None, logging.WARNING
            try:
                if what == "snapshot":
                    summary = self.snapshot(stop)
                    if not summary.complete and self.snapshot_due():  # (the fail-safe's refusal is not retried)
                        reason = summary.reason or "incomplete"
                else:
                    with self.reader.retrying_for(CYCLE_RETRY_SECONDS):
                        self.cycle()
            except READ_FAILURES as e:
                reason = failure(e, self.tracking_uri)
                if isinstance(e, AuthenticationFailed):  # the credentials or permissions need a change
                    level = logging.ERROR
            if stop.is_set():
                break
            deadline = started + poll
            if reason is None:
                failures = 0
            else:
                failures += 1
                wait = self._backoff(failures)
                deadline = time.monotonic() + wait  # after a failure, a whole backoff before the next attempt
                log.log(level, "producer: %s failed %d time%s in a row (%s); next attempt in %.3g s", what, failures,
                        "" if failures == 1 else "s", reason, wait)
            while not stop.is_set():
                HEARTBEATS.beat("producer")
                if self._features_due() and deadline > time.monotonic():
                    self._refresh_reported(timeout=0)  # what webhooks reported goes first
                    self._features_step_or_backoff()
                else:
                    self._refresh_reported(timeout=min(0.2, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    break
        HEARTBEATS.forget("producer")

    def _backoff(self, failures: int) -> float:
        poll = self.cfg.producer.poll_interval_seconds
        return min(poll * 2 ** min(failures - 1, 16), max(poll, BACKOFF_MAX_SECONDS))

    def _refresh_reported(self, timeout: float) -> None:
        """The targeted reads webhooks asked for, and those due again after a failure: all those waiting,
        after up to `timeout` seconds for the first (none: only those already waiting). Each registered
        model is read by itself: one that MLflow keeps failing holds up no other (see `_targeted_read`)."""
        now = time.monotonic()
        names = {name for name, at in self._read_again_at.items() if at <= now}
        through = self.requests_read() if self.requests_read is not None else None  # before the queue is drained
        try:
            if not names:
                names.add(self.refresh_requests.get(timeout=timeout) if timeout > 0
                          else self.refresh_requests.get_nowait())
        except queue.Empty:
            if through is not None:  # every request read so far was taken from the queue and applied
                self.requests_offset = through
            return
        while not self.refresh_requests.empty():
            names.add(self.refresh_requests.get_nowait())
        changes = ChangeSet()
        for name in sorted(names):
            self._read_again_at.pop(name, None)
            one = self._targeted_read(name)
            if one is not None:
                changes.entities += one.entities
                changes.deleted_keys += one.deleted_keys
        if changes.entities or changes.deleted_keys:
            self._publish(changes, None)
        if through is not None:
            self.requests_offset = through  # applied: written with the next position

    def _targeted_read(self, name: str) -> ChangeSet | None:
        """The targeted read of one registered model, each request retried for TARGETED_READ_RETRY_SECONDS at
        most. None when it failed: it is tried again after a backoff; after TARGETED_READ_ATTEMPTS failures
        while MLflow answers other requests, the model is skipped with a warning naming it, and counted in
        `skipped_objects` (the next complete snapshot reads it again)."""
        try:
            with self.reader.retrying_for(TARGETED_READ_RETRY_SECONDS):
                changes = read_model(self.reader, self.known, self.experiment_names, name, self.signatures)
            self._read_failures.pop(name, None)
            return changes
        except READ_FAILURES as e:
            reason = failure(e, self.tracking_uri)
        if not self._mlflow_answers():  # an outage, not this model's: not counted against it
            self._read_again_at[name] = time.monotonic() + self._backoff(1)
            log.warning("producer: targeted read of registered model %r failed (%s); MLflow does not answer, "
                        "tried again in %.3g s", name, reason, self._backoff(1))
            return None
        failures = self._read_failures.pop(name, 0) + 1
        if failures >= TARGETED_READ_ATTEMPTS:
            self.skipped_objects += 1
            log.warning("producer: skipped registered model %r: its targeted read failed %d times while MLflow "
                        "answered other requests (last: %s); the next complete snapshot reads it again", name,
                        failures, reason)
            return None
        self._read_failures[name] = failures
        wait = self._backoff(failures)
        self._read_again_at[name] = time.monotonic() + wait
        log.warning("producer: targeted read of registered model %r failed (%s); attempt %d of %d in %.3g s",
                    name, reason, failures + 1, TARGETED_READ_ATTEMPTS, wait)
        return None

    def _mlflow_answers(self) -> bool:
        """Whether MLflow answers a cheap request (within TARGETED_READ_RETRY_SECONDS)."""
        try:
            with self.reader.retrying_for(TARGETED_READ_RETRY_SECONDS):
                self.reader.check()
            return True
        except READ_FAILURES:
            return False

    def close(self) -> None:
        self.writer.flush(30)
