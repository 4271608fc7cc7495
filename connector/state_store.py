"""Kafka edge of the consumer's state: the compacted state topic, co-partitioned with the change
topic. Partition p of the state topic holds the state of change partition p; a consumer that is
assigned partition p rebuilds it by reading state partition p to its end (read committed)."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from connector.state import SNAPSHOT_KEY, Entry, PartitionState

log = logging.getLogger(__name__)


def restore(bootstrap: str, topic: str, partitions: list[int], extra: dict[str, object] | None = None,
            timeout: float = 120.0) -> dict[int, PartitionState]:
    """Read the given state partitions from the beginning to their end."""
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
        **(extra or {}),
    })
    try:
        pending = set(partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            ends[p] = high
            if high <= low:
                pending.discard(p)
        reader.assign([TopicPartition(topic, p, 0) for p in pending])
        deadline = time.monotonic() + timeout
        records = 0
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"state topic {topic} partitions {sorted(pending)} not read to their end "
                                   f"in {timeout:.0f} s (an open transaction of a crashed instance?)")
            for msg in reader.consume(1000, timeout=1.0):
                p = msg.partition()
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(p)
                        continue
                    raise RuntimeError(f"reading state topic {topic}[{p}]: {msg.error()}")
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


def write(producer: Producer, topic: str, partition: int, changes: dict[str, Entry | None]) -> None:
    """Queue state changes (inside the caller's transaction); None writes a tombstone."""
    for urn, entry in changes.items():
        value = entry.to_json() if entry is not None else None
        producer.produce(topic, key=urn.encode(), value=value, partition=partition)


__all__ = ["SNAPSHOT_KEY", "restore", "write"]
