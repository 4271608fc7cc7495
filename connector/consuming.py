"""Reading batches from a Kafka consumer without waiting for batches that will not fill."""

from __future__ import annotations

from confluent_kafka import Consumer, Message


def consume_batch(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Up to `max_messages`: waits up to `timeout` for the first, then takes what has already arrived.

    `Consumer.consume(n, timeout)` returns early only once n messages have arrived: a batch that
    does not fill (the last records of a topic, a single new event) would wait the whole timeout.
    """
    first = consumer.consume(1, timeout=timeout)
    if not first or max_messages <= 1:
        return first
    return first + consumer.consume(max_messages - 1, timeout=0)
