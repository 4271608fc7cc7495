"""Replay: rewind the consumer group and reprocess the change topic (docs/operations.md, "Replay").

The consumer's decisions depend on its state (which aspects it already wrote, which URNs each
change key owns, which snapshot saw them). A replay from offset S must decide exactly as the
original consumer did at S, so the state is rebuilt *as of S* from the change topic itself: the
events before S are run through the same pure decisions with their MCPs discarded, and the
state topic is rewritten to that state in one Kafka transaction. Then the group's offsets are set
to S with the admin API and an ordinary `ChangeConsumer` reprocesses from S to the end offsets
captured when the replay started.

- `--from-beginning`: S is each partition's low watermark; the state starts empty, so every
  aspect of every event is written again (into an empty MCP topic: the original's final state).
- `--from-timestamp T`: S is the first offset whose record timestamp is at or after T (the end of
  the partition if there is none); the MCPs the original wrote after T are written again, soft
  deletes of entities created before T included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.datahub.decisions import SNAPSHOT_KEY, Entry, PartitionState, Policy, decide
from connector.errors import OperatorError
from connector.kafka import state_store
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import read_committed
from connector.kafka.topics import partition_count, topic_configs
from connector.kafka.transactions import TransactionalWriter
from connector.pipeline.consumer import ChangeConsumer

log = logging.getLogger("connector.replay")

FROM_TIMESTAMP = "--from-timestamp"


class ReplayError(OperatorError):
    """An expected reason not to replay (or to stop): one line for the operator."""


# -- the --from-timestamp argument ----------------------------------------------------------------


def parse_timestamp(text: str, now_ms: int | None = None) -> int:
    """ISO-8601 (`2026-11-27T10:00:00Z`; without a zone: UTC) or epoch milliseconds -> epoch ms."""
    value = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if value.isdigit():
        ms = int(value)
        if ms < 100_000_000_000:  # before 1973 in ms: almost certainly seconds
            raise ReplayError(f"{FROM_TIMESTAMP} {text}: looks like epoch seconds; give epoch milliseconds "
                              f"({ms * 1000}) or an ISO-8601 time")
    else:
        iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
        try:
            parsed = datetime.fromisoformat(iso)
        except ValueError:
            raise ReplayError(f"{FROM_TIMESTAMP} {text!r}: not an ISO-8601 time (like 2026-11-27T10:00:00Z) "
                              "nor epoch milliseconds") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        ms = int(parsed.timestamp() * 1000)
    if ms > now:
        raise ReplayError(f"{FROM_TIMESTAMP} {text}: {_iso(ms)} is in the future; nothing would be replayed")
    return ms


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# -- offsets and group ----------------------------------------------------------------------------


def active_members(client: AdminClient, group: str, timeout: float = 60.0) -> int:
    """Members of the group; retries while its coordinator moves or loads (a broker restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            description = client.describe_consumer_groups([group], request_timeout=30)[group].result()
            return len(description.members)
        except KafkaException as e:
            error = e.args[0] if e.args else None
            transient = isinstance(error, KafkaError) and (error.retriable() or error.code() in (
                KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TRANSPORT))
            if not transient:
                raise
            if time.monotonic() > deadline:
                raise ReplayError(f"members of group {group} not readable: {error.str()}") from None
            time.sleep(1.0)


def refuse_if_active(client: AdminClient, group: str) -> None:
    members = active_members(client, group)
    if members:
        raise ReplayError(f"stop the consumers of group {group} first ({members} "
                          f"{'member' if members == 1 else 'members'} active)")


def _list_offsets(client: AdminClient, topic: str, partitions: int, spec: OffsetSpec,
                  timeout: float = 30.0) -> dict[int, int]:
    futures = client.list_offsets({TopicPartition(topic, p): spec for p in range(partitions)},
                                  isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout)
    return {tp.partition: f.result().offset for tp, f in futures.items()}


@dataclass
class Plan:
    """Per partition of the change topic: low watermark, replay start, end (last stable offset)."""

    lows: dict[int, int]
    starts: dict[int, int]
    ends: dict[int, int]

    def pending(self) -> dict[int, int]:
        """Partitions with something to reprocess -> the offset to reach."""
        return {p: end for p, end in self.ends.items() if self.starts[p] < end}


def committed(client: AdminClient, group: str, topic: str, partitions: int, timeout: float = 60.0
              ) -> dict[int, int]:
    """The group's committed offsets on the topic (partitions without one are left out), once they
    are stable: offsets a consumer committed in a transaction are pending until the transaction's
    markers are written, and an offset altered before that would be overwritten by them."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = client.list_consumer_group_offsets([request], require_stable=True,
                                                        request_timeout=30)[group].result()
            errors = [tp.error for tp in result.topic_partitions if tp.error is not None]
        except KafkaException as e:
            errors = [e.args[0]]
        if not errors:
            return {tp.partition: tp.offset for tp in result.topic_partitions if tp.offset >= 0}
        unstable = all(isinstance(e, KafkaError) and e.code() == KafkaError.UNSTABLE_OFFSET_COMMIT for e in errors)
        if not unstable or time.monotonic() > deadline:
            raise ReplayError(f"committed offsets of group {group} not readable: {errors[0]}")
        time.sleep(0.5)


def plan(client: AdminClient, group: str, topic: str, since_ms: int | None) -> Plan:
    partitions = partition_count(client, topic)
    lows = _list_offsets(client, topic, partitions, OffsetSpec.earliest())
    ends = _list_offsets(client, topic, partitions, OffsetSpec.latest())
    if since_ms is None:
        return Plan(lows, dict(lows), ends)
    found = _list_offsets(client, topic, partitions, OffsetSpec.for_timestamp(since_ms))
    starts = {p: found[p] if found[p] >= 0 else ends[p] for p in range(partitions)}
    # Never skip what the group has not consumed yet (a partition without a committed offset: from
    # its beginning, as a consumer would start): a rewind past it would leave those events in the
    # state but never in DataHub.
    consumed = committed(client, group, topic, partitions)
    for p in range(partitions):
        offset = consumed.get(p, lows[p])
        if max(offset, lows[p]) < starts[p]:
            log.info("%s[%d]: group %s has consumed only up to offset %d, before the first event at or after the "
                     "timestamp (%d): replaying from %d", topic, p, group, offset, starts[p], max(offset, lows[p]))
            starts[p] = max(offset, lows[p])
    return Plan(lows, starts, ends)


def rewind(client: AdminClient, group: str, topic: str, starts: dict[int, int], attempts: int = 5,
           timeout: float = 30.0) -> None:
    """Set the group's offsets, and check that they hold (see `committed`)."""
    for _ in range(attempts):
        committed(client, group, topic, len(starts))  # wait for pending transactional commits
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in sorted(starts.items())])
        future = client.alter_consumer_group_offsets([request], request_timeout=timeout)[group]
        try:
            result = future.result()
        except KafkaException as e:
            raise ReplayError(f"offsets of group {group} not changed: {e.args[0].str() if e.args else e} "
                              "(a consumer of the group still running?)") from None
        for tp in result.topic_partitions:
            if tp.error is not None:
                raise ReplayError(f"offset of group {group} on {topic}[{tp.partition}] not changed: "
                                  f"{tp.error.str()}")
        now = committed(client, group, topic, len(starts))
        if all(now.get(p) == o for p, o in starts.items()):
            return
        log.info("offsets of group %s overwritten by a late transactional commit; setting them again", group)
    raise ReplayError(f"offsets of group {group} did not stay where the replay set them (a consumer of the "
                      "group still running?)")


# -- state as of the replay start -----------------------------------------------------------------


def state_before(cfg: ConnectorConfig, lows: dict[int, int], starts: dict[int, int],
                 stop: threading.Event | None = None, stall_seconds: float = 120.0) -> dict[int, PartitionState]:
    """The consumer's state just before each partition's start offset, derived from the events
    between the low watermark and the start (read committed), as the consumer derived it."""
    k = cfg.kafka
    topic = k.topics.changes
    stateful = cfg.stateful
    policy = Policy(stateful.enabled, stateful.remove_stale_metadata, stateful.fail_safe_threshold)
    settings = cfg.mapping_settings()
    states = {p: PartitionState() for p in starts}
    todo = {p: s for p, s in starts.items() if s > lows[p]}
    if not todo:
        return states
    started = time.monotonic()
    events = skipped = 0
    try:
        for msg in read_committed(KafkaConnection(k), topic, role="replay state", partitions=sorted(todo),
                                  until=todo, timeout=stall_seconds, stop=stop):
            p = msg.partition()
            try:
                outcome = decide(codec.decode(msg.value()), states[p], policy, settings)
            except Exception:  # as in the consumer: the record's fault (dead-lettered there)
                skipped += 1
                continue
            states[p].apply(outcome.state)
            events += 1
    except InterruptedError:
        raise ReplayError("replay interrupted while deriving the state; nothing was changed") from None
    except TimeoutError as e:
        raise ReplayError(f"{topic}: {e}") from None
    known = sum(len(s.entries) for s in states.values())
    log.info("state as of the replay start derived from %d earlier events (%d malformed skipped) in %.1f s: "
             "%d URNs known", events, skipped, time.monotonic() - started, known)
    return states


def rewrite_state(cfg: ConnectorConfig, states: dict[int, PartitionState]) -> tuple[int, int]:
    """Make the state topic hold exactly `states`, in one transaction. Returns (written, removed)."""
    k = cfg.kafka
    connection = KafkaConnection(k)
    current = state_store.restore(connection, k.topics.state, sorted(states))
    changes: dict[int, dict[str, Entry | None]] = {}
    written = removed = 0
    for p, target in states.items():
        have = current.get(p, PartitionState())
        delta: dict[str, Entry | None] = {}
        for urn in have.entries.keys() - target.entries.keys():
            delta[urn] = None
        for urn, entry in target.entries.items():
            if have.entries.get(urn) != entry:
                delta[urn] = entry
        if have.open_snapshot != target.open_snapshot:
            delta[SNAPSHOT_KEY] = Entry(seen=target.open_snapshot) if target.open_snapshot else None
        removed += sum(1 for v in delta.values() if v is None)
        written += sum(1 for v in delta.values() if v is not None)
        changes[p] = delta
    if not written and not removed:
        log.info("state topic %s already holds the state as of the replay start", k.topics.state)
        return 0, 0
    writer = TransactionalWriter(connection, f"{k.transactional_id_prefix}-replay", "replay",
                                 {"transaction.timeout.ms": 300000, "linger.ms": 20})

    def fill(w: TransactionalWriter) -> None:
        for p, delta in changes.items():
            state_store.write(w, k.topics.state, p, delta)

    writer.transaction(fill, timeout=300)
    log.info("state topic %s rewritten to the state as of the replay start: %d entries written, %d removed",
             k.topics.state, written, removed)
    return written, removed


# -- the replay -----------------------------------------------------------------------------------


@dataclass
class ReplaySummary:
    group: str
    topic: str
    mcp_topic: str
    since_ms: int | None
    plan: Plan
    events: int = 0
    mcps: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    soft_deletes: int = 0
    dead_letters: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        origin = "the beginning" if self.since_ms is None else f"{_iso(self.since_ms)} ({self.since_ms})"
        out = [f"replay of {self.topic} from {origin} for group {self.group}: complete",
               f"  events reprocessed: {self.events}",
               f"  MCPs acknowledged on {self.mcp_topic}: {sum(self.mcps.values())} "
               f"(unchanged aspects skipped: {self.unchanged}, soft deletes: {self.soft_deletes}, "
               f"dead letters: {self.dead_letters})"]
        out += [f"    {aspect:32} {count}" for aspect, count in sorted(self.mcps.items())]
        out.append(f"  seconds: {self.seconds:.1f}")
        return out


def replay(cfg: ConnectorConfig, since_ms: int | None, stop: threading.Event,
           instance_id: str | None = None, member_check_seconds: float = 15.0) -> ReplaySummary:
    """Rewind the group to the start (beginning or `since_ms`), put the state topic in the state as of
    that start, and reprocess up to the end offsets of now. The group must have no active member."""
    started = time.monotonic()
    k = cfg.kafka
    topic, group = k.topics.changes, k.consumer_group
    client = KafkaConnection(k).admin()
    refuse_if_active(client, group)
    where = plan(client, group, topic, since_ms)
    summary = ReplaySummary(group, topic, k.topics.mcp, since_ms, where)
    for p in sorted(where.starts):
        start, end = where.starts[p], where.ends[p]
        log.info("%s[%d]: replay from offset %d to %d (low watermark %d)%s", topic, p, start, end, where.lows[p],
                 "" if start < end else ": nothing to replay")
    if since_ms is not None:
        lag = topic_configs(client, [topic]).get(topic, {}).get("min.compaction.lag.ms", "")
        if lag.isdigit() and time.time() * 1000 - since_ms > int(lag):
            log.warning("%s is older than min.compaction.lag.ms of %s (%s ms): compaction may have kept only "
                        "the latest event of some keys, so the replay may differ from what the original wrote",
                        _iso(since_ms), topic, lag)
    pending = where.pending()
    if not pending:
        log.info("nothing to replay on %s", topic)
        summary.seconds = time.monotonic() - started
        return summary
    rewrite_state(cfg, state_before(cfg, where.lows, where.starts, stop))
    refuse_if_active(client, group)
    rewind(client, group, topic, where.starts)
    log.info("group %s rewound on %s; reprocessing %d partitions", group, topic, len(pending))

    joined: list[int] = []
    last_check = [time.monotonic()]

    def reached_end(consumer: ChangeConsumer) -> bool:
        if time.monotonic() - last_check[0] >= member_check_seconds:
            last_check[0] = time.monotonic()
            try:
                members = active_members(client, group, timeout=0)
            except (KafkaException, ReplayError) as e:
                log.debug("members of group %s: %s", group, e)
                members = 1
            if members > 1:
                joined.append(members)
                return True
        try:
            positions = consumer.consumer.position([TopicPartition(topic, p) for p in pending])
        except KafkaException:
            return False
        # position() moves past transaction markers and aborted records, which the consumed
        # offsets (ChangeConsumer.positions) never reach.
        return all(max(tp.offset, consumer.positions.get(tp.partition, -1)) >= pending[tp.partition]
                   for tp in positions)

    consumer = ChangeConsumer(cfg, instance_id or "replay")
    consumer.run(stop, should_stop=reached_end)
    stats = consumer.stats
    summary.events, summary.mcps, summary.unchanged = stats.events, stats.mcps, stats.unchanged
    summary.soft_deletes, summary.dead_letters = stats.soft_deletes, stats.dead_letters
    summary.seconds = time.monotonic() - started
    if joined:
        raise ReplayError(f"another consumer joined group {group} during the replay ({joined[0]} members); "
                          f"the replay stopped after {stats.events} events: stop the other consumers and "
                          "run the replay again")
    if stop.is_set():
        raise ReplayError(f"replay interrupted after {stats.events} events: run it again, or start the "
                          "consumers to continue from where it stopped (group and state topic agree)")
    return summary
