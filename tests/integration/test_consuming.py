"""Reading against the real broker: consume_batch (a batch that cannot fill comes back without waiting
out the timeout, and nothing is skipped or repeated) and read_committed (records of a transaction not
yet decided when the read starts are waited for, or left out by a look at what is stable now)."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connector.config import KafkaConfig
from connector.kafka.clients import KafkaConnection
from connector.kafka.reading import consume_batch, read_committed
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


def _undecided_transaction(kafka: Kafka) -> tuple[str, Producer]:
    """A topic of one partition: three committed records, then a fourth in a transaction left open."""
    topic = f"t{uuid.uuid4().hex[:10]}.pending"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    done = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": f"{topic}-done"})
    done.init_transactions(30)
    done.begin_transaction()
    for i in range(3):
        done.produce(topic, value=f"committed {i}".encode())
    done.commit_transaction(30)
    pending = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": f"{topic}-pending"})
    pending.init_transactions(30)
    pending.begin_transaction()
    pending.produce(topic, value=b"pending")
    assert pending.flush(30) == 0  # on the broker, past the last stable offset
    return topic, pending


def _read_in_background(kafka: Kafka, topic: str, **kwargs: object) -> tuple[threading.Thread, list[bytes]]:
    connection = KafkaConnection(KafkaConfig(bootstrap_servers=kafka.bootstrap))
    values: list[bytes] = []

    def read() -> None:
        values.extend(m.value() for m in read_committed(connection, topic, role="test", **kwargs))  # type: ignore[misc, arg-type]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, values


def test_read_committed_waits_for_a_transaction_undecided_when_it_starts(kafka: Kafka) -> None:
    """As a state restore right after another instance's commit (markers not yet written) must: the
    read ends once the transaction is decided, with its records when it commits."""
    topic, pending = _undecided_transaction(kafka)
    reader, values = _read_in_background(kafka, topic, timeout=60.0)
    reader.join(3.0)
    assert reader.is_alive(), f"the read ended at the last stable offset with {values}"
    pending.commit_transaction(30)
    reader.join(30.0)
    assert not reader.is_alive()
    assert values == [b"committed 0", b"committed 1", b"committed 2", b"pending"]


def test_read_committed_leaves_out_an_aborted_transaction_once_decided(kafka: Kafka) -> None:
    topic, pending = _undecided_transaction(kafka)
    reader, values = _read_in_background(kafka, topic, timeout=60.0)
    reader.join(3.0)
    assert reader.is_alive()
    pending.abort_transaction(30)
    reader.join(30.0)
    assert not reader.is_alive()
    assert values == [b"committed 0", b"committed 1", b"committed 2"]


def test_a_look_at_what_is_stable_does_not_wait_for_an_undecided_transaction(kafka: Kafka) -> None:
    """`status` and `dump` read with settled=False: what is stable now, at once."""
    topic, pending = _undecided_transaction(kafka)
    try:
        reader, values = _read_in_background(kafka, topic, timeout=60.0, settled=False)
        reader.join(20.0)
        assert not reader.is_alive()
        assert values == [b"committed 0", b"committed 1", b"committed 2"]
    finally:
        pending.abort_transaction(30)
