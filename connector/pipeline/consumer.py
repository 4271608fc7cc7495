"""Consumer: change events -> MCPs on DataHub's MCP topic, exactly once.

Reads the change topic with `isolation.level=read_committed`; for each batch it writes the MCPs,
the state changes and the consumed offsets in one Kafka transaction. A malformed record goes to
the dead-letter topic (in the same transaction) with the error in its headers, and so does an
event whose MCP cannot be made to fit the broker's message size (an MCP over it is truncated
first, as DataHub does). If writing fails (broker or schema registry unreachable), the transaction
is aborted, the in-memory state is rolled back, and the batch is read again after a backoff:
nothing is acknowledged that was not written.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.serialization import SerializationError
from datahub.emitter.mcp import MetadataChangeProposalWrapper

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.contract.envelope import changed_at_ms
from connector.contract.events import ChangeEvent
from connector.datahub.decisions import Entry, PartitionState, Policy, decide, still_seen
from connector.datahub.mapping import UrnTooLong
from connector.datahub.oversize import fit_to_size
from connector.errors import first_line
from connector.kafka import state_store
from connector.kafka.clients import KafkaConnection
from connector.kafka.mcp_serde import McpSerializer, RegistryRefused, RegistryUnavailable
from connector.kafka.reading import consume_batch
from connector.kafka.transactions import TransactionalWriter, WriterWedged, kafka_error
from connector.observability.http import HEARTBEATS
from connector.observability.metrics import METRICS

log = logging.getLogger("connector.consumer")

# Room left in a message for its key, headers and record framing (librdkafka counts them against
# message.max.bytes, the broker against its own limit).
RECORD_OVERHEAD_BYTES = 512

RETRY_MAX_SECONDS = 30.0
LAG_SECONDS = 5.0  # how often the lag metric is measured

@dataclass
class ConsumerStats:
    events: int = 0
    mcps: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    dead_letters: int = 0
    soft_deletes: int = 0
    changed_at_ms: int | None = None  # when MLflow changed the newest entity written (source lag)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, other: ConsumerStats) -> None:
        """Add another's counts (notes and warnings are logged where they arise, not kept)."""
        self.events += other.events
        self.mcps.update(other.mcps)
        self.unchanged += other.unchanged
        self.dead_letters += other.dead_letters
        self.soft_deletes += other.soft_deletes
        if other.changed_at_ms is not None:
            self.changed_at_ms = max(self.changed_at_ms or 0, other.changed_at_ms)


class _Undo:
    """Previous values of the state entries a batch changed, to roll back on abort."""

    def __init__(self) -> None:
        self.saved: dict[tuple[int, str], Entry | None] = {}
        self.snapshots: dict[int, str | None] = {}

    def remember(self, partition: int, state: PartitionState, changes: dict[str, Entry | None]) -> None:
        self.snapshots.setdefault(partition, state.open_snapshot)
        for urn in changes:
            self.saved.setdefault((partition, urn), state.entries.get(urn))

    def rollback(self, states: dict[int, PartitionState]) -> None:
        for (partition, urn), entry in self.saved.items():
            if partition not in states:
                continue
            if entry is None:
                states[partition].entries.pop(urn, None)
            else:
                states[partition].entries[urn] = entry
        for partition, snapshot in self.snapshots.items():
            if partition in states:
                states[partition].open_snapshot = snapshot


# Settings of the change-topic consumer. Membership is dynamic: a stopped instance leaves the group
# at once (static membership would keep it listed for a session timeout, and `replay` could not tell a
# stopped consumer from a running one).
CONSUMER_SETTINGS = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    "max.poll.interval.ms": 600000,
    # A member learns of a rebalance from its next heartbeat: frequent ones let a joining or
    # leaving instance (a snapshot's consumers start together) take its share within a second.
    "heartbeat.interval.ms": 500,
    # An instance that dies without leaving (SIGKILL, a lost node) keeps its partitions until this runs out;
    # then the others take them over (librdkafka's default is 45 s).
    "session.timeout.ms": 10000,
}

# A dead instance's open transaction holds its partitions' state back from their next owner until the
# broker aborts it: transaction.timeout.ms plus up to the broker's cleanup interval (10 s by default).
# A batch is written in well under a second; this leaves room for slow brokers.
TRANSACTION_TIMEOUT_MS = 15000


class ChangeConsumer:
    def __init__(self, cfg: ConnectorConfig, instance_id: str | None = None) -> None:
        self.cfg = cfg
        k = cfg.kafka
        self.topics = k.topics
        self.connection = KafkaConnection(k)
        self.bootstrap = self.connection.bootstrap
        self.settings = cfg.mapping_settings()
        stateful = cfg.stateful
        self.policy = Policy(stateful.enabled, stateful.remove_stale_metadata, stateful.fail_safe_threshold)
        self.serializer = McpSerializer(self.connection.schema_registry(), k.topics.mcp)
        self.max_message_bytes = cfg.consumer.max_message_bytes
        self.states: dict[int, PartitionState] = {}
        self.positions: dict[int, int] = {}
        self.stats = ConsumerStats()
        self.instance_id = instance_id or socket.gethostname()
        self.consumer = self.connection.group_consumer("consumer", k.consumer_group,
                                                       {**CONSUMER_SETTINGS, "client.id": self.instance_id})
        # The transactional writer of MCPs, state and offsets. librdkafka refuses messages over
        # 1,000,000 bytes by default; allow what consumer.max_message_bytes allows (the MCP topic's
        # own limit must allow it too).
        self.writer = TransactionalWriter(
            self.connection, f"{k.transactional_id_prefix}-consumer-{k.topics.changes}-{self.instance_id}",
            "consumer's MCP writer",
            {"transaction.timeout.ms": TRANSACTION_TIMEOUT_MS, "linger.ms": 20,
             "message.max.bytes": max(1_000_000, self.max_message_bytes + RECORD_OVERHEAD_BYTES)})
        self._failures = 0  # failed attempts to write the current batch
        self._delay = 1.0  # backoff before the next attempt

    # -- partition assignment --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [p.partition for p in partitions]
        self.states.update(state_store.restore(self.connection, self.topics.state, numbers))
        METRICS.partitions_assigned(numbers, held=True)
        log.info("consumer %s: partitions %s of %s assigned", self.instance_id,
                 ", ".join(map(str, sorted(self.states))) or "none", self.topics.changes)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.states.pop(p.partition, None)
        METRICS.partitions_assigned([p.partition for p in partitions], held=False)

    # -- main loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, should_stop: Callable[[ChangeConsumer], bool] | None = None,
            progress_seconds: float = 10.0, wait_seconds: float = 0.5) -> ConsumerStats:
        """Consumes until `stop` is set or `should_stop(self)`, asked before each wait of up to
        `wait_seconds` for records, says so."""
        self.consumer.subscribe([self.topics.changes], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("consumer %s reading %s into %s", self.instance_id, self.topics.changes, self.topics.mcp)
        last_report = last_lag = time.monotonic()
        reported = 0
        try:
            while not stop.is_set():
                HEARTBEATS.beat("consumer")
                if should_stop is not None and should_stop(self):
                    break
                if time.monotonic() - last_lag >= LAG_SECONDS:
                    METRICS.consumer_lag.set(self._lag())
                    last_lag = time.monotonic()
                messages = consume_batch(self.consumer, self.cfg.consumer.batch_size, timeout=wait_seconds)
                batch = self._of_assigned([m for m in messages if not self._skip_error(m)])
                if batch:
                    self._process_batch(batch, stop)
                if time.monotonic() - last_report >= progress_seconds and self.stats.events != reported:
                    log.info("consumer: %d events, %d MCPs written, %d unchanged aspects skipped",
                             self.stats.events, sum(self.stats.mcps.values()), self.stats.unchanged)
                    last_report, reported = time.monotonic(), self.stats.events
        finally:
            HEARTBEATS.forget("consumer")
            self.consumer.close()
        return self.stats

    def _lag(self) -> int:
        """Change events not yet consumed on this process's partitions (from the watermarks the fetches
        already brought: no request)."""
        lag = 0
        for tp in self.consumer.assignment():
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                position = self.consumer.position([tp])[0].offset
            except KafkaException:
                continue
            if high >= 0 and position >= 0:
                lag += max(0, high - position)
        return lag

    def _of_assigned(self, messages: list[Message]) -> list[Message]:
        """The records of partitions this instance still holds. A rebalance inside consume() may revoke a
        partition whose records were already fetched: they are its next owner's, and are never processed
        here with an empty state (nor their offsets committed by this instance)."""
        kept = [m for m in messages if m.partition() in self.states]
        if len(kept) != len(messages):
            log.info("consumer: %d fetched records of revoked partitions left to their next owner",
                     len(messages) - len(kept))
        return kept

    def _skip_error(self, msg: Message) -> bool:
        error = msg.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.fatal():
            raise KafkaException(error)
        log.warning("consumer: %s", error.str())
        return True

    def _process_batch(self, batch: list[Message], stop: threading.Event) -> None:
        """Write a batch in one transaction. When that fails, nothing of it is acknowledged: the
        in-memory state is rolled back, the partitions are rewound to the batch's first offsets,
        and after a backoff the main loop reads the batch again. (Going back to consume() rather
        than retrying in place keeps the consumer in its group through a long outage, and a
        rebalance meanwhile is honoured.)"""
        undo = _Undo()
        stats = ConsumerStats()
        offsets: dict[int, int] = {}
        for msg in batch:
            offsets[msg.partition()] = max(offsets.get(msg.partition(), 0), msg.offset() + 1)
        try:
            self.writer.begin()
            for msg in batch:
                self._process(msg, undo, stats)
            self.writer.send_offsets([TopicPartition(self.topics.changes, p, o) for p, o in offsets.items()],
                                     self.consumer.consumer_group_metadata())
            self.writer.commit()
        except Exception as e:
            undo.rollback(self.states)
            if isinstance(e, RegistryRefused):  # wrong credentials: no retry helps; nothing was acknowledged
                self.writer.abort(e)
                raise
            wedged = isinstance(e, WriterWedged)
            if not wedged:
                self.writer.abort(e)
            self._rewind(batch)
            self._failures += 1
            if stop.is_set():
                log.warning("consumer stopping: batch of %d events not written (%s); nothing of it was "
                            "acknowledged, it is read again on restart", len(batch), self._describe(e))
                return
            log.warning("consumer: batch of %d events not written (%s); nothing acknowledged, retry %d in %.0f s",
                        len(batch), self._describe(e), self._failures, self._delay)
            if wedged:
                self.writer.fence()
            stop.wait(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)
            return
        if self._failures:
            log.info("consumer: batch of %d events written after %d failed attempts", len(batch), self._failures)
            self._failures, self._delay = 0, 1.0
        self.positions.update(offsets)
        METRICS.consumed(stats.events, dict(stats.mcps), stats.unchanged, stats.soft_deletes, stats.dead_letters,
                         stats.changed_at_ms)
        for note in stats.notes:
            log.info("%s", note)
        for warning in stats.warnings:
            log.warning("%s", warning)
        self.stats.add(stats)

    def _rewind(self, batch: list[Message]) -> None:
        """Seek each partition of the batch back to its first record in the batch."""
        first: dict[int, int] = {}
        for msg in batch:
            first[msg.partition()] = min(first.get(msg.partition(), msg.offset()), msg.offset())
        for partition, offset in first.items():
            try:
                self.consumer.seek(TopicPartition(self.topics.changes, partition, offset))
            except KafkaException as e:  # no longer assigned: its next owner starts at the committed offset
                log.debug("rewinding %s[%d]: %s", self.topics.changes, partition, e)

    def _describe(self, error: Exception) -> str:
        """What failed, for people: which system, and its own words."""
        if isinstance(error, WriterWedged):
            return f"Kafka at {self.bootstrap}: {error}"
        if isinstance(error, RegistryUnavailable):
            return str(error)
        kafka = kafka_error(error)
        if kafka is not None:
            text = f"Kafka at {self.bootstrap}: {kafka.str()}"
            if kafka.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                text += (f" (consumer.max_message_bytes is {self.max_message_bytes}; the topic's "
                         "max.message.bytes must allow it)")
            return text
        return f"{type(error).__name__}: {first_line(error)}"

    # -- one record ------------------------------------------------------------------------------

    def _process(self, msg: Message, undo: _Undo, stats: ConsumerStats) -> None:
        partition = msg.partition()
        state = self.states[partition]  # assigned: records of revoked partitions never get here
        try:
            event = codec.decode(msg.value())
        except Exception as e:  # decoding is pure: what fails here is the record's fault
            self._dead_letter(msg, e, stats=stats)
            return
        try:
            outcome = decide(event, state, self.policy, self.settings)
        except Exception as e:  # mapping is pure too
            self._dead_letter(msg, e, event, undo, stats)
            return
        # Serialise (and fit) every MCP before writing any, so an event is written whole or not at
        # all. The registry being unreachable raises RegistryUnavailable: the batch is retried.
        try:
            records = [self._serialize(mcp) for mcp in outcome.mcps]
        except (RegistryUnavailable, RegistryRefused):
            raise
        except Exception as e:
            if isinstance(e, KafkaException) and not isinstance(e, SerializationError):
                raise
            # This event's MCPs cannot be written (too large even when truncated, or not
            # serialisable): it must not block the partition, and must not vanish either.
            log.error("%s: its MCPs cannot be written (%s)", event["key"], first_line(e))
            self._dead_letter(msg, e, event, undo, stats)
            return
        stats.events += 1
        stats.changed_at_ms = max(stats.changed_at_ms or 0, changed_at_ms(event))
        stats.unchanged += outcome.skipped
        stats.notes.extend(outcome.notes)  # logged once the batch is committed
        stats.warnings.extend(outcome.warnings)
        for mcp, key, value in records:
            self.writer.produce(self.topics.mcp, key, value)
            stats.mcps[str(mcp.aspectName)] += 1
            if mcp.aspectName == "status" and getattr(mcp.aspect, "removed", False):
                stats.soft_deletes += 1
        undo.remember(partition, state, outcome.state)
        state_store.write(self.writer, self.topics.state, partition, outcome.state)
        state.apply(outcome.state)

    def _serialize(self, mcp: MetadataChangeProposalWrapper) -> tuple[MetadataChangeProposalWrapper, bytes, bytes]:
        """(MCP as written, key, value); an MCP over the message size is truncated, with a warning."""
        key = self.serializer.key(mcp)
        value = self.serializer.value(mcp)
        limit = self.max_message_bytes - len(key) - RECORD_OVERHEAD_BYTES
        if len(value) > limit:
            mcp, value, note = fit_to_size(mcp, self.serializer.value, limit)
            log.warning("%s", note)
        return mcp, key, value

    def _dead_letter(self, msg: Message, error: Exception, event: ChangeEvent | None = None,
                     undo: _Undo | None = None, stats: ConsumerStats | None = None) -> None:
        """The record to the dead-letter topic. An entity whose event could be read but not written
        still exists in MLflow: what its key owns counts as seen by the open snapshot, so the
        snapshot's end does not take it for gone (its last written state stays in DataHub)."""
        if stats is not None:
            stats.dead_letters += 1
        if event is not None and undo is not None:
            partition = msg.partition()
            state = self.states[partition]
            kept = still_seen(event, state)
            if kept:
                undo.remember(partition, state, kept)
                state_store.write(self.writer, self.topics.state, partition, kept)
                state.apply(kept)
        self._send_dead_letter(msg, error)

    def _send_dead_letter(self, msg: Message, error: Exception) -> None:
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        what = "change event not writable to DataHub" if isinstance(error, UrnTooLong) else "malformed change event"
        log.warning("%s at %s (%s): sent to %s", what, where, first_line(error), self.topics.dead_letter)
        self.writer.produce(
            self.topics.dead_letter, msg.key(), msg.value(),
            headers=[("error", first_line(error).encode()), ("error.type", type(error).__name__.encode()),
                     ("source.topic", msg.topic().encode()), ("source.partition", str(msg.partition()).encode()),
                     ("source.offset", str(msg.offset()).encode())],
        )

