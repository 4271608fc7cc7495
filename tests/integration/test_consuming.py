"""consume_batch against the real broker: a batch that cannot fill comes back without waiting out
the timeout, and nothing is skipped or repeated."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connector.kafka.reading import consume_batch
from tests.conftest import Kafka

TIMEOUT = 20.0  # what Consumer.consume(n, TIMEOUT) would wait for a batch of n that never fills


def _topic_with(kafka: Kafka, count: int) -> str:
    topic = f"t{uuid.uuid4().hex[:10]}.batches"
    client = AdminClient({"bootstrap.servers": kafka.bootstrap})
    client.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(count):
        producer.produce(topic, key=str(i).encode(), value=str(i).encode(), partition=i % 2)
    assert producer.flush(30) == 0
    return topic


def _consumer(kafka: Kafka, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"{topic}-group",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    return consumer


def test_a_batch_that_cannot_fill_comes_back_without_waiting_out_the_timeout(kafka: Kafka) -> None:
    topic = _topic_with(kafka, 25)
    consumer = _consumer(kafka, topic)
    try:
        assert len(consume_batch(consumer, 1, timeout=TIMEOUT)) == 1  # the group is joined, fetching runs
        time.sleep(1.0)  # the rest is fetched meanwhile
        started = time.monotonic()
        batches = []
        while sum(map(len, batches)) < 24:  # one batch, or a few if a fetch was still on its way
            batches.append(consume_batch(consumer, 500, timeout=TIMEOUT))
        elapsed = time.monotonic() - started
    finally:
        consumer.close()
    assert sum(map(len, batches)) == 24 and len(batches) <= 3, [len(b) for b in batches]
    assert elapsed < TIMEOUT / 2, f"waited {elapsed:.1f} s for batches of 500 that could not fill"


def test_batches_carry_every_record_once_in_partition_order(kafka: Kafka) -> None:
    topic = _topic_with(kafka, 1200)
    consumer = _consumer(kafka, topic)
    seen: dict[int, list[int]] = {0: [], 1: []}
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, seen.values())) < 1200 and time.monotonic() < deadline:
            batch = consume_batch(consumer, 500, timeout=1.0)
            assert len(batch) <= 500
            for msg in batch:
                assert msg.error() is None
                seen[msg.partition()].append(int(msg.value()))
        assert consume_batch(consumer, 500, timeout=0.5) == []  # nothing more: an empty batch
    finally:
        consumer.close()
    assert seen[0] == list(range(0, 1200, 2))
    assert seen[1] == list(range(1, 1200, 2))
