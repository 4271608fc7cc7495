"""One transactional writer for the producer, the consumer and replay: begin, produce, send offsets,
commit, abort, fence. It holds librdkafka's rules in one place:

- a commit whose outcome is unknown (a timeout, a broker that restarts) is retried, never aborted
  and written again: that would duplicate what was committed (librdkafka makes a repeated
  `commit_transaction()` idempotent);
- a fatal error (the writer was fenced by a newer one with its transactional.id) is raised, never
  retried; anything else is aborted and may be retried by the caller;
- `send_offsets_to_transaction` runs with a deadline that holds: librdkafka up to at least 2.16
  ignores the call's timeout when the group coordinator is lost meanwhile (a broker restart) and can
  block forever (librdkafka issues #5456, #5511); a writer stuck there is abandoned and a new one with
  the same transactional.id fences it (`fence()`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from connector.kafka.clients import KafkaConnection

log = logging.getLogger("connector.transactions")

SEND_OFFSETS_TIMEOUT_S = 10.0
WEDGE_GRACE_S = 5.0


class WriterWedged(Exception):
    """A transactional call did not return in time; the writer must be fenced (`fence()`)."""


def is_fatal(error: BaseException) -> bool:
    """A Kafka error after which this writer can do nothing more (fenced, or a broken producer)."""
    return (isinstance(error, KafkaException) and bool(error.args) and isinstance(error.args[0], KafkaError)
            and error.args[0].fatal())


def kafka_error(error: BaseException) -> KafkaError | None:
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        return error.args[0]
    return None


class TransactionalWriter:
    def __init__(self, connection: KafkaConnection, transactional_id: str, role: str,
                 settings: Mapping[str, Any] | None = None, init_timeout: float = 60.0) -> None:
        self.transactional_id = transactional_id
        self.role = role
        self._make = lambda: connection.producer(role, {"transactional.id": transactional_id, **(settings or {})})
        self._init_timeout = init_timeout
        self._wedged: list[Producer] = []  # writers abandoned in a librdkafka call that never returned
        self.producer = self._new()

    def _new(self) -> Producer:
        producer = self._make()
        producer.init_transactions(self._init_timeout)
        return producer

    # -- a transaction -------------------------------------------------------------------------------

    def begin(self) -> None:
        self.producer.begin_transaction()

    def produce(self, topic: str, key: bytes | None, value: bytes | None, **kwargs: Any) -> None:
        """Queue a record in the open transaction, waiting while the local queue is full."""
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, **kwargs)
                break
            except BufferError:  # let deliveries drain the queue
                self.producer.poll(0.5)
        self.producer.poll(0)

    def send_offsets(self, offsets: list[TopicPartition], group_metadata: object,
                     timeout: float = SEND_OFFSETS_TIMEOUT_S) -> None:
        """Consumed offsets into the transaction, with a deadline that holds (see the module)."""
        producer = self.producer
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                producer.send_offsets_to_transaction(offsets, group_metadata, timeout)
                outcome.append(None)
            except BaseException as e:  # handed to the caller
                outcome.append(e)

        helper = threading.Thread(target=call, name="send-offsets", daemon=True)
        helper.start()
        helper.join(timeout + WEDGE_GRACE_S)
        if not outcome:
            raise WriterWedged(f"send_offsets_to_transaction did not return in {timeout + WEDGE_GRACE_S:.0f} s "
                               "(group coordinator lost; librdkafka #5456)")
        if outcome[0] is not None:
            raise outcome[0]

    def commit(self, timeout: float = 60.0) -> None:
        """Commit, retrying while the outcome is unknown; only an error that requires an abort (or a
        fatal one) is raised."""
        delay = 0.5
        while True:
            try:
                self.producer.commit_transaction(timeout)
                return
            except KafkaException as e:
                error = e.args[0]
                if error.fatal() or error.txn_requires_abort() or not error.retriable():
                    raise
                log.warning("%s: transaction commit not confirmed yet (%s); retrying the commit", self.role,
                            error.str())
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def abort(self, error: BaseException | None = None) -> None:
        """Abort the open transaction after `error`; a fatal error (of the write or of the abort) is raised."""
        if error is not None and is_fatal(error):
            raise error
        try:
            self.producer.abort_transaction(60)
        except KafkaException as e:
            if is_fatal(e):
                raise
            log.debug("%s: abort_transaction: %s", self.role, e)

    def transaction(self, fill: Callable[[TransactionalWriter], None], timeout: float = 60.0) -> None:
        """One transaction: begin, `fill(self)`, commit; on failure it is aborted and the error raised."""
        self.begin()
        try:
            fill(self)
            self.commit(timeout)
        except Exception as e:
            self.abort(e)
            raise

    def transaction_with_retry(self, fill: Callable[[TransactionalWriter], None], what: str,
                               max_delay: float = 30.0) -> None:
        """`transaction(fill)` until it is written: a failed attempt is aborted, logged and retried
        after a backoff; a fatal error is raised. `fill` must be repeatable."""
        delay = 1.0
        while True:
            try:
                self.transaction(fill)
                return
            except KafkaException as e:
                if is_fatal(e):
                    raise
                error = kafka_error(e)
                log.warning("%s: %s not written (%s); retrying in %.0f s", self.role, what,
                            error.str() if error is not None else e, delay)
                time.sleep(delay)
                delay = min(delay * 2, max_delay)

    # -- the writer itself ---------------------------------------------------------------------------

    def fence(self) -> None:
        """Abandon this writer (stuck in librdkafka: it is never touched again, destroying it could block
        too) and start a new one with the same transactional.id, which fences the old one: Kafka aborts
        its open transaction. Retried until the new one is ready; a fatal error is raised."""
        self._wedged.append(self.producer)
        log.warning("%s: replacing the writer (transactional.id %s); the stuck one's open transaction is aborted "
                    "by Kafka", self.role, self.transactional_id)
        while True:
            try:
                self.producer = self._new()
                return
            except KafkaException as e:
                if is_fatal(e):
                    raise
                log.warning("%s: new writer not ready (%s); retrying in 5 s", self.role, e)
                time.sleep(5)

    def flush(self, timeout: float = 30.0) -> int:
        return self.producer.flush(timeout)
