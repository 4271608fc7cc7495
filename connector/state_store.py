"""Kafka edge of the consumer's state: the compacted state topic, co-partitioned with the change
topic. Partition p of the state topic holds the state of change partition p; a consumer that is
assigned partition p rebuilds it by reading state partition p to its end (read committed)."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from connector.consuming import consume_batch
from connector.kafka_logging import librdkafka_logger
from connector.state import SNAPSHOT_KEY, Entry, PartitionState

log = logging.getLogger(__name__)


def restore(bootstrap: str, topic: str, partitions: list[int], extra: dict[str, object] | None = None,
            timeout: float = 120.0) -> dict[int, PartitionState]:
    """Read the given state partitions from the beginning to their end. While the broker is not
    ready (restarting, leadership moving) the read is retried until `timeout`."""
    states = {p: PartitionState() for p in partitions}
    if not partitions:
        return states
    reader = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "mlflow-datahub-state-restore",  # never commits; assign() only
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "logger": librdkafka_logger(),
        **(extra or {}),
    })
    try:
        deadline = time.monotonic() + timeout
        pending = set(partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = _watermarks(reader, TopicPartition(topic, p), deadline)
            ends[p] = high
            if high <= low:
                pending.discard(p)
        reader.assign([TopicPartition(topic, p, 0) for p in pending])
        records = 0
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"state topic {topic} partitions {sorted(pending)} not read to their end "
                                   f"in {timeout:.0f} s (an open transaction of a crashed instance?)")
            for msg in consume_batch(reader, 1000, timeout=1.0):
                p = msg.partition()
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(p)
                        continue
                    if msg.error().fatal():
                        raise RuntimeError(f"reading state topic {topic}[{p}]: {msg.error()}")
                    log.debug("reading state topic %s[%d]: %s", topic, p, msg.error())  # retried until deadline
                    continue
                records += 1
                key = msg.key().decode()
                value = msg.value()
                states[p].apply({key: Entry.from_json(value) if value is not None else None})
                if msg.offset() + 1 >= ends[p]:
                    pending.discard(p)
        known = sum(len(s.entries) for s in states.values())
        log.info("state restored for partitions %s: %d URNs known (%d records read)", partitions, known, records)
        return states
    finally:
        reader.close()


def _watermarks(reader: Consumer, tp: TopicPartition, deadline: float) -> tuple[int, int]:
    delay = 0.5
    while True:
        try:
            return reader.get_watermark_offsets(tp, timeout=min(30.0, max(deadline - time.monotonic(), 1.0)))
        except KafkaException as e:
            error = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if (error is not None and error.fatal()) or time.monotonic() + delay > deadline:
                raise
            log.warning("state topic %s[%d] not readable yet (%s); retrying in %.1f s", tp.topic, tp.partition,
                        error.str() if error is not None else e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def write(producer: Producer, topic: str, partition: int, changes: dict[str, Entry | None]) -> None:
    """Queue state changes (inside the caller's transaction); None writes a tombstone."""
    for urn, entry in changes.items():
        value = entry.to_json() if entry is not None else None
        producer.produce(topic, key=urn.encode(), value=value, partition=partition)


__all__ = ["SNAPSHOT_KEY", "restore", "write"]
