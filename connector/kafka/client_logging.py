"""Kafka clients' own reports, made readable: librdkafka's log lines with repeats suppressed, and
an error callback that says in the connector's words when Kafka is unreachable."""

from __future__ import annotations

import logging
import re
import threading
import time

from confluent_kafka import KafkaError

log = logging.getLogger("connector.kafka")


class RepeatFilter(logging.Filter):
    """One line per kind of librdkafka message per window, not one per reconnect attempt.

    While a broker is down librdkafka logs every failed connection attempt of every client
    (several per second); the first of a kind passes, the repeats within `window` seconds are
    counted, and the next one after the window says how many were suppressed."""

    _VARIABLE = re.compile(r"rdkafka#[a-z]+-\d+|\d+")

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._VARIABLE.sub("#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            first, suppressed = self._seen.get(kind, (0.0, 0))
            if now - first < self.window:
                self._seen[kind] = (first, suppressed + 1)
                return False
            self._seen[kind] = (now, 0)
            if len(self._seen) > 1000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like it in the last {self.window:.0f} s)"
            record.args = None
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger of librdkafka's own messages, with repeats suppressed (once per process)."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


class KafkaErrors:
    """error_cb of a client: Kafka being unreachable is said once, in the connector's words, and
    again only if it lasts (librdkafka reports it every few seconds while it does)."""

    def __init__(self, client: str, bootstrap: str, repeat_seconds: float = 60.0) -> None:
        self.client = client
        self.bootstrap = bootstrap
        self.repeat_seconds = repeat_seconds
        self._last: dict[int, float] = {}

    def __call__(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("%s: fatal Kafka error: %s", self.client, error.str())
            return
        now = time.monotonic()
        if now - self._last.get(error.code(), -self.repeat_seconds) < self.repeat_seconds:
            return
        self._last[error.code()] = now
        log.warning("%s: Kafka at %s: %s; librdkafka keeps retrying", self.client, self.bootstrap, error.str())
