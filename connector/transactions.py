"""Kafka transactions, committed the way librdkafka asks for: an unconfirmed commit is retried,
never aborted and written again."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, Producer

log = logging.getLogger(__name__)


def commit_transaction(producer: Producer, timeout: float = 60.0) -> None:
    """Commit, retrying while the outcome is unknown. A retriable error (a timeout, a broker that
    restarts) does not mean the commit failed: aborting then and writing again would duplicate what
    was committed. librdkafka makes a repeated commit_transaction() idempotent; only an error that
    requires an abort (or a fatal one) is raised to the caller."""
    delay = 0.5
    while True:
        try:
            producer.commit_transaction(timeout)
            return
        except KafkaException as e:
            error = e.args[0]
            if error.fatal() or error.txn_requires_abort() or not error.retriable():
                raise
            log.warning("transaction commit not confirmed yet (%s); retrying the commit", error.str())
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
