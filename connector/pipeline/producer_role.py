"""The producer role of `run` and `produce`: any number of instances side by side, one producer at a time.

Every instance joins the producer-role group (connector/kafka/membership.py), named like the producer's
`transactional.id` (`<prefix>-producer-<change topic>`). The member that holds the role runs the
`ChangeProducer`: creating it fences whatever producer held the role before (Kafka aborts its open
transaction at once), and it continues from the stored position. The others stand by: no MLflow request,
no Kafka writes, ready within a session timeout. A holder that loses the role stops between two
transactions; one fenced while it still holds the role (a `snapshot` of the same pipeline, an instance
that was cut off) waits, then takes it up again.

Webhook deliveries reach whichever instance the load balancer picks: each instance writes what it
accepts to the webhook-requests topic (`WebhookRequests.put`, acknowledged by Kafka before MLflow gets
its 202), and the holder reads that topic from the offset its position records, so a delivery accepted
by a standby, or just before a takeover, is still applied.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from connector.config import ConnectorConfig
from connector.kafka.clients import KafkaConnection
from connector.kafka.membership import RoleMembership
from connector.kafka.reading import watermarks
from connector.kafka.transactions import TransactionalWriter, is_fatal
from connector.mlflow.reader import MlflowReader
from connector.mlflow.webhooks import NotQueued
from connector.observability.http import HEARTBEATS
from connector.observability.metrics import METRICS
from connector.pipeline.position import producer_id, role_key
from connector.pipeline.producer import ChangeProducer, now_ms

log = logging.getLogger("connector.producer")

FENCED_WAIT_SECONDS = 30.0  # a holder fenced by a producer outside the group waits this long, then takes it up
RELEASE_WAIT_SECONDS = 120.0  # a revocation waits this long at most for the producer's transaction to end
REQUEST_ACK_SECONDS = 10.0  # a webhook delivery waits this long at most for Kafka's acknowledgement


class ProducerRole:
    """Holds the producer role when the group gives it, stands by otherwise, until `stop`."""

    def __init__(self, cfg: ConnectorConfig, reader: MlflowReader, instance_id: str | None = None) -> None:
        self.cfg = cfg
        self.reader = reader
        self.instance_id = instance_id or socket.gethostname()
        self.connection = KafkaConnection(cfg.kafka)
        self.group_id = producer_id(cfg)
        self.producer: ChangeProducer | None = None  # while this instance holds the role
        self.since_ms: int | None = None
        self._acquired = threading.Event()
        self._halt = threading.Event()  # of the current hold: its producer must stop (the role is gone, or a stop)
        self._idle = threading.Event()  # no producer runs
        self._idle.set()
        self._lock = threading.Lock()  # a hold begins, or the role is released: never both at once
        self.membership = RoleMembership(
            self.connection, self.group_id, cfg.kafka.topics.producer_offsets, self.instance_id,
            int(cfg.producer.role_session_timeout_seconds * 1000), self._on_acquired, self._on_released)
        METRICS.producer_role_standby()

    # -- told by the group (in the membership's thread) ------------------------------------------

    def _on_acquired(self) -> None:
        log.info("producer role: taken by instance %s (group %s)", self.instance_id, self.group_id)
        self._acquired.set()

    def _on_released(self, lost: bool) -> None:
        with self._lock:
            self._acquired.clear()
            self._halt.set()
        if not self._idle.wait(RELEASE_WAIT_SECONDS):
            log.warning("producer role: the producer did not stop within %.0f s; the next holder fences it",
                        RELEASE_WAIT_SECONDS)
        log.info("producer role: %s by instance %s", "lost (no heartbeat reached Kafka in time)" if lost
                 else "handed over", self.instance_id)

    # -- the role --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Until `stop`: the producer while the role is held; a standby in between."""
        leave = threading.Event()
        membership = threading.Thread(target=self._serve_group, args=(leave,), name="producer-role", daemon=True)
        membership.start()
        log.info("instance %s: standing by for the producer role of %s", self.instance_id,
                 self.cfg.kafka.topics.changes)
        try:
            while not stop.is_set():
                HEARTBEATS.beat("producer role")
                if not membership.is_alive():
                    raise RuntimeError("the producer-role group's thread ended")  # its error is logged there
                if not self._acquired.wait(0.2):
                    continue
                with self._lock:  # a release from now on waits for this hold to end
                    if not self._acquired.is_set():
                        continue
                    halt = self._halt = threading.Event()
                    self._idle.clear()
                try:
                    self._hold(stop, halt)
                finally:
                    self._idle.set()
        finally:
            self._halt.set()
            leave.set()  # leaving the group hands the role over at once
            membership.join(RELEASE_WAIT_SECONDS)
            HEARTBEATS.forget("producer role")

    def _serve_group(self, leave: threading.Event) -> None:
        try:
            self.membership.run(leave, beat=lambda: HEARTBEATS.beat("producer role"))
        except Exception as e:  # a fatal Kafka error: the instance ends (see run)
            log.error("producer role group %s: %s", self.group_id, e)

    def _hold(self, stop: threading.Event, halt: threading.Event) -> None:
        """The producer, from the stored position, until the role is gone (`halt`) or `stop`."""
        stopper = threading.Thread(target=_join_events, args=(stop, halt), name="producer-halt", daemon=True)
        stopper.start()
        tail: RequestTail | None = None
        try:
            if halt.is_set():
                return
            producer = ChangeProducer(self.cfg, self.reader)  # fences the previous holder, restores the position
            self.producer = producer
            self.since_ms = now_ms()
            self._announce(producer.writer)
            METRICS.producer_role_held(self.since_ms / 1000)
            if self.cfg.webhooks is not None:
                tail = RequestTail(self.connection, self.cfg, producer.position.requests_offset, producer)
                producer.requests_read = tail.read_through
                tail.start()
            producer.run(halt)
        except KafkaException as e:
            if not is_fatal(e):
                raise
            if halt.is_set():
                log.info("producer role: the producer of instance %s was fenced by the next holder", self.instance_id)
                return
            log.warning("producer role: instance %s holds the role but its producer was fenced by another one with "
                        "transactional.id %s (a `snapshot` of this pipeline?); taking it up again in %.0f s",
                        self.instance_id, self.group_id, FENCED_WAIT_SECONDS)
            halt.wait(FENCED_WAIT_SECONDS)
        finally:
            if tail is not None:
                tail.stop()
            if self.producer is not None:
                try:
                    self.producer.close()
                except KafkaException as e:
                    log.debug("producer close: %s", e)
            self.producer = None
            self.since_ms = None
            METRICS.producer_role_standby()
            halt.set()  # ends the stopper
            stopper.join(1)

    def _announce(self, writer: TransactionalWriter) -> None:
        """Who holds the role since when, in the producer-offsets topic (read by `status`)."""
        record = {"instance": self.instance_id, "host": socket.gethostname(), "since_ms": self.since_ms}
        topic = self.cfg.kafka.topics.producer_offsets

        def fill(w: TransactionalWriter) -> None:
            w.produce(topic, role_key(self.cfg), json.dumps(record).encode())

        writer.transaction_with_retry(fill, "producer role record")


def _join_events(stop: threading.Event, halt: threading.Event) -> None:
    """Sets `halt` once `stop` is set (a stop of the instance stops the producer), until `halt` is set."""
    while not halt.is_set():
        if stop.wait(0.2):
            halt.set()


class WebhookRequests:
    """Where every instance puts the webhook deliveries it accepts: the webhook-requests topic, keyed by
    change topic. `put` returns once Kafka has acknowledged the record (NotQueued if it has not)."""

    def __init__(self, cfg: ConnectorConfig, instance_id: str) -> None:
        self.topic = cfg.kafka.topics.webhook_requests
        self.key = cfg.kafka.topics.changes.encode()
        self.instance_id = instance_id
        self.producer = KafkaConnection(cfg.kafka).producer("webhook requests", {
            "enable.idempotence": True, "linger.ms": 2, "message.timeout.ms": int(REQUEST_ACK_SECONDS * 1000)})
        self._lock = threading.Lock()

    def put(self, model_name: str) -> None:
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def delivered(error: KafkaError | None, _msg: Any) -> None:
            outcome.append(error)
            done.set()

        value = json.dumps({"registered_model": model_name, "received_ms": now_ms(), "instance": self.instance_id})
        try:
            with self._lock:
                self.producer.produce(self.topic, key=self.key, value=value.encode(), on_delivery=delivered)
        except (BufferError, KafkaException) as e:
            raise NotQueued(f"Kafka did not take the request: {e}") from None
        deadline = time.monotonic() + REQUEST_ACK_SECONDS + 1
        while not done.is_set() and time.monotonic() < deadline:
            with self._lock:
                self.producer.poll(0.05)
        if not outcome:
            raise NotQueued(f"Kafka did not acknowledge the request within {REQUEST_ACK_SECONDS:.0f} s")
        if outcome[0] is not None:
            raise NotQueued(f"Kafka did not acknowledge the request ({outcome[0].str()})")

    def close(self) -> None:
        self.producer.flush(REQUEST_ACK_SECONDS)


class RequestTail:
    """The holder's reader of the webhook-requests topic: from `start_offset` (the position's; None: the end)
    onward, each request of this change topic onto the producer's queue of targeted reads."""

    def __init__(self, connection: KafkaConnection, cfg: ConnectorConfig, start_offset: int | None,
                 producer: ChangeProducer) -> None:
        self.topic = cfg.kafka.topics.webhook_requests
        self.key = cfg.kafka.topics.changes.encode()
        self.queue = producer.refresh_requests
        self.reader = connection.reader("webhook requests", settings={"isolation.level": "read_committed",
                                                                     "auto.offset.reset": "latest"})
        self.start_offset = start_offset
        self._read_through: int | None = start_offset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-requests", daemon=True)

    def read_through(self) -> int | None:
        """The offset up to which every request is on the queue."""
        return self._read_through

    def start(self) -> None:
        if self.start_offset is None:  # the first holder ever: from the topic's end as it is now
            self.start_offset = self._read_through = watermarks(self.reader, TopicPartition(self.topic, 0),
                                                                time.monotonic() + 30)[1]
        self.reader.assign([TopicPartition(self.topic, 0, self.start_offset)])
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.reader.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    if msg.error().fatal():
                        log.error("webhook requests: %s", msg.error().str())
                        return
                    continue
                if msg.key() == self.key:
                    try:
                        name = json.loads(msg.value())["registered_model"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("webhook requests: record %d is not a request; skipped", msg.offset())
                    else:
                        self.queue.put(str(name))
                self._read_through = msg.offset() + 1
        finally:
            self.reader.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
