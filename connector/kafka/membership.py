"""One role among any number of instances, held through Kafka's group protocol (as Kafka Connect's workers
elect their leader): every instance joins one consumer group that subscribes to a single-partition topic;
the member assigned that partition holds the role, the others stand by.

- The partition is assigned with `cooperative-sticky`: an instance that joins never moves it, so a new
  standby takes nothing from the holder.
- A holder that stops gracefully leaves the group: the partition goes to a standby at once.
- A holder that dies (SIGKILL, a lost node) is evicted after `session.timeout.ms` without a heartbeat; a
  standby then gets the partition. A holder cut off from Kafka for that long loses it too (`on_lost`),
  and what it still writes is refused once the new holder has fenced it (transactional.id).
- Assignment and revocation are told to the caller's callbacks; revocation waits until the caller has
  let the role go, so that a graceful handover never has two holders.

The partition's records are never read: it is paused as soon as it is assigned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connector.kafka.clients import KafkaConnection

log = logging.getLogger("connector.kafka")


def membership_settings(instance_id: str, session_timeout_ms: int) -> dict[str, object]:
    """The librdkafka settings of a role group's member. Pure."""
    return {
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(200, min(1000, session_timeout_ms // 10)),
        "enable.auto.commit": False,
        "auto.offset.reset": "latest",
        "client.id": instance_id,
    }


class RoleMembership:
    """Membership of `group_id`; whoever is assigned partition 0 of `topic` holds the role.

    `on_acquired()` is called when this instance gets the role, `on_released(lost)` when it loses it (lost:
    evicted without a handover); both run in the thread of `run()`, and `run()` serves the group only
    while they return, so `on_released` is where the caller stops using the role."""

    def __init__(self, connection: KafkaConnection, group_id: str, topic: str, instance_id: str,
                 session_timeout_ms: int, on_acquired: Callable[[], None],
                 on_released: Callable[[bool], None]) -> None:
        self.group_id = group_id
        self.topic = topic
        self.instance_id = instance_id
        self._on_acquired = on_acquired
        self._on_released = on_released
        self.held = False
        self.consumer: Consumer = connection.membership(
            "producer role", group_id, membership_settings(instance_id, session_timeout_ms))

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        mine = [p for p in partitions if p.topic == self.topic]
        consumer.incremental_assign(partitions)
        if partitions:
            consumer.pause(partitions)  # the records are not for this member: nothing is fetched
        if mine and not self.held:
            self.held = True
            self._on_acquired()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool = False) -> None:
        if self.held and any(p.topic == self.topic for p in partitions):
            self.held = False
            self._on_released(lost)
        try:
            consumer.incremental_unassign(partitions)
        except KafkaException as e:  # already unassigned (a lost assignment)
            log.debug("producer role: unassign: %s", e)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked(consumer, partitions, lost=True)

    def run(self, stop: threading.Event, beat: Callable[[], None] | None = None) -> None:
        """Serves the group until `stop` is set, then leaves it (the role, if held, is released first)."""
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)
        try:
            while not stop.is_set():
                if beat is not None:
                    beat()
                msg = self.consumer.poll(0.2)
                if msg is not None and msg.error() is not None:
                    error = msg.error()
                    if error.fatal():
                        raise KafkaException(error)
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.debug("producer role group %s: %s", self.group_id, error.str())
        finally:
            self.consumer.close()  # leaves the group: on_revoke runs first, a standby is assigned at once
            if self.held:
                self.held = False
                self._on_released(False)
