"""Reading topics: batches that do not wait for what will not come, a topic's committed records up to
its end (or up to given offsets), watermarks retried while a partition has no leader, a group's lag."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connector.kafka.clients import KafkaConnection

log = logging.getLogger("connector.kafka")

# Errors of a partition without a leader yet (a topic just created, a broker that restarts).
_NO_LEADER_YET = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                  KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TRANSPORT, KafkaError._TIMED_OUT)


def consume_batch(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Up to `max_messages`: waits up to `timeout` for the first, then takes what has already arrived.

    `Consumer.consume(n, timeout)` returns early only once n messages have arrived: a batch that
    does not fill (the last records of a topic, a single new event) would wait the whole timeout.
    """
    first = consumer.consume(1, timeout=timeout)
    if not first or max_messages <= 1:
        return first
    return first + consumer.consume(max_messages - 1, timeout=0)


def watermarks(reader: Consumer, partition: TopicPartition, deadline: float) -> tuple[int, int]:
    """Low and high watermark; retried until `deadline` (monotonic) while the partition has no leader
    or the broker does not answer."""
    delay = 0.5
    while True:
        try:
            return reader.get_watermark_offsets(partition, timeout=min(30.0, max(deadline - time.monotonic(), 1.0)))
        except KafkaException as e:
            error = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            transient = error is not None and not error.fatal() and (
                error.retriable() or error.code() in _NO_LEADER_YET)
            if not transient or time.monotonic() + delay > deadline:
                raise
            log.debug("%s[%d] not readable yet (%s); retrying in %.1f s", partition.topic, partition.partition,
                      error.str() if error is not None else e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def partitions_of(reader: Consumer, topic: str, timeout: float = 30.0) -> list[int]:
    """The topic's partitions; none for a topic that does not exist (yet)."""
    meta = reader.list_topics(topic, timeout=timeout).topics[topic]
    if meta.error is not None and meta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
        raise KafkaException(meta.error)
    return sorted(meta.partitions)


def read_committed(connection: KafkaConnection, topic: str, *, role: str, partitions: list[int] | None = None,
                   until: dict[int, int] | None = None, timeout: float = 120.0,
                   stop: threading.Event | None = None, settled: bool = True) -> Iterator[Message]:
    """Every committed record of `topic` (read_committed) from each partition's beginning up to
    `until[p]` (exclusive; default: the partition's end when the read starts), in partition order.

    Records of a transaction not yet decided when the read starts are waited for (`settled`): a
    transaction whose commit has returned is decided, but its markers reach the partitions a moment
    later, and until then the partition's last stable offset stops short of its records. A state
    restored in that moment would miss the last batch that its committed offsets include. With
    `settled=False` the read stops where the undecided records begin (a look at what is stable now,
    which must not wait for anyone's transaction).

    While the broker is not ready (restarting, leadership moving) the read is retried; a read that
    makes no progress for `timeout` seconds raises TimeoutError (an open transaction of a crashed
    instance holds the last stable offset back until the broker aborts it). A fatal error raises
    KafkaException."""
    reader = connection.reader(role, settings={"isolation.level": "read_committed", "enable.partition.eof": True,
                                              "auto.offset.reset": "earliest"})
    # A read_committed client's high watermark is the last stable offset; the end of the partition,
    # undecided records included, is what a read_uncommitted client sees.
    ends = connection.reader(role, settings={"isolation.level": "read_uncommitted"}) if settled else reader
    try:
        deadline = time.monotonic() + timeout
        numbers = partitions if partitions is not None else partitions_of(reader, topic)
        targets: dict[int, int] = {}
        assignment = []
        for p in numbers:
            low, high = watermarks(ends, TopicPartition(topic, p), deadline)
            end = high if until is None else min(until.get(p, high), high)
            if end > low:
                targets[p] = end
                assignment.append(TopicPartition(topic, p, low))
        reader.assign(assignment)
        progress = time.monotonic()
        while targets:
            if stop is not None and stop.is_set():
                raise InterruptedError(f"reading {topic} interrupted")
            moved = False
            for msg in consume_batch(reader, 1000, timeout=0.5):
                p = msg.partition()
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # The end of what is stable: the end of the read, unless records of an
                        # undecided transaction lie between it and the target.
                        if until is None and (not settled or msg.offset() >= targets.get(p, 0)):
                            targets.pop(p, None)
                        continue
                    if error.fatal():
                        raise KafkaException(error)
                    log.debug("reading %s[%d]: %s", topic, p, error.str())  # retried until the timeout
                    continue
                moved = True
                if p not in targets or msg.offset() >= targets[p]:
                    continue
                yield msg
                if msg.offset() + 1 >= targets[p]:
                    targets.pop(p, None)
            # position() moves past transaction markers and aborted records, which no record reaches.
            for tp in reader.position([TopicPartition(topic, p) for p in targets]):
                if tp.offset >= targets[tp.partition]:
                    targets.pop(tp.partition, None)
                    moved = True
            if moved:
                progress = time.monotonic()
            elif time.monotonic() - progress > timeout:
                raise TimeoutError(f"{topic} partitions {sorted(targets)} not read to their end in {timeout:.0f} s "
                                   "(an open transaction of a crashed instance?)")
    finally:
        reader.close()
        if ends is not reader:
            ends.close()


def consumer_lag(connection: KafkaConnection, topic: str, group: str) -> dict[int, int]:
    """Records of `topic` not yet consumed by `group`, per partition: end offsets minus committed offsets
    (a probe with the group's id reads its commits without joining it). Transaction markers take
    offsets too: a partition is caught up once nothing readable is left after its committed offset."""
    probe = connection.reader("lag probe", group, {"isolation.level": "read_committed"})
    try:
        partitions = [TopicPartition(topic, p) for p in partitions_of(probe, topic)]
        committed = {tp.partition: max(tp.offset, 0) for tp in probe.committed(partitions, timeout=30)}
        lag: dict[int, int] = {}
        for tp in partitions:
            low, high = probe.get_watermark_offsets(tp, timeout=30)
            start = max(committed[tp.partition], low)
            lag[tp.partition] = 0
            if high > start:
                probe.assign([TopicPartition(topic, tp.partition, start)])
                message = probe.poll(1.0)
                if message is not None and not message.error():
                    lag[tp.partition] = high - start
        return lag
    finally:
        probe.close()
