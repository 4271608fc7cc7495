"""Kafka edge of the consumer's state: the compacted state topic, co-partitioned with the change
topic. Partition p of the state topic holds the state of change partition p; a consumer that is
assigned partition p rebuilds it by reading state partition p to its end (read committed)."""

from __future__ import annotations

import logging

from connector.datahub.decisions import SNAPSHOT_KEY, Entry, PartitionState
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import read_committed
from connector.kafka.transactions import TransactionalWriter

log = logging.getLogger("connector.state_store")


def restore(connection: KafkaConnection, topic: str, partitions: list[int],
            timeout: float = 120.0) -> dict[int, PartitionState]:
    """Read the given state partitions from the beginning to their end. While the broker is not
    ready (restarting, leadership moving) the read is retried until `timeout`."""
    states = {p: PartitionState() for p in partitions}
    if not partitions:
        return states
    records = 0
    for msg in read_committed(connection, topic, role="state restore", partitions=partitions, timeout=timeout):
        records += 1
        value = msg.value()
        states[msg.partition()].apply({msg.key().decode(): Entry.from_json(value) if value is not None else None})
    known = sum(len(s.entries) for s in states.values())
    log.info("state restored for partitions %s: %d URNs known (%d records read)", partitions, known, records)
    return states


def write(writer: TransactionalWriter, topic: str, partition: int, changes: dict[str, Entry | None]) -> None:
    """Queue state changes (inside the writer's open transaction); None writes a tombstone."""
    for urn, entry in changes.items():
        writer.produce(topic, urn.encode(), entry.to_json() if entry is not None else None, partition=partition)


__all__ = ["SNAPSHOT_KEY", "restore", "write"]
