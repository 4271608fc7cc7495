"""`mlflow-datahub snapshot`: one complete pass, over once every MCP of it is acknowledged.

The producer reads MLflow in this process; consumers work in forked processes of their own, in
the connector's consumer group, so that they have a core while the producer waits on MLflow. The
fork comes first: the consumers load DataHub's modules while this process loads MLflow's. Each
consumer reports the positions it has committed; once every partition of the change topic is past
the offset of the snapshot's END marker, the snapshot is over; then the features pass reads the
signatures the snapshot met unread (a snapshot reads no artifact), and once the consumers are past
what it published, the command stops them and adds up what they wrote.

No Kafka client may exist across the fork (librdkafka's threads do not survive it): the producer
and each consumer make their own after it.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from connector.config import ConnectorConfig
from connector.errors import OperatorError

if TYPE_CHECKING:
    from connector.mlflow.reader import MlflowReader
    from connector.pipeline.consumer import ChangeConsumer, ConsumerStats
    from connector.pipeline.producer import FeaturesPass, SnapshotSummary

log = logging.getLogger("connector.snapshot")

STOP_SECONDS = 120.0  # for a consumer to finish its batch and report, once told to stop
# How long a snapshot's consumer waits for records before it looks for the command's stop: short,
# since the command waits for it to stop once the last events are written.
SNAPSHOT_CONSUMER_WAIT_SECONDS = 0.05


class SnapshotFailed(OperatorError):
    """A consumer failed, or the snapshot was interrupted: the message says which."""


@dataclass
class SnapshotResult:
    summary: SnapshotSummary
    stats: ConsumerStats
    features: FeaturesPass | None = None  # the signatures read after the snapshot (None: none were due)
    snapshot_seconds: float = 0.0  # from the command's start until every MCP of the snapshot was acknowledged


def _consume(cfg: ConnectorConfig, instance_id: str | None, conn: Connection, topics_ready: Any) -> None:
    """A consumer process: once the command has checked the topics (`topics_ready`, a multiprocessing
    Event), reports its committed positions as they move, until told to stop (None) or the command is
    gone; then answers ("stats", ConsumerStats) or ("error", message)."""
    from connector.kafka.mcp_serde import RegistryUnavailable
    from connector.pipeline.consumer import ChangeConsumer

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the command decides; it tells us
        signal.signal(signum, signal.SIG_IGN)
    while not topics_ready.wait(0.05):
        if conn.poll():  # told to stop before the topics were there
            conn.send(("error", "stopped before the topics were checked"))
            return
    reported: dict[int, int] = {}

    def told_to_stop(c: ChangeConsumer) -> bool:
        nonlocal reported
        if c.positions != reported:
            reported = dict(c.positions)
            conn.send(("positions", reported))
        if conn.poll():
            try:
                conn.recv()
            except EOFError:
                pass
            stop.set()
        return stop.is_set()

    try:
        stats = ChangeConsumer(cfg, instance_id).run(stop, should_stop=told_to_stop,
                                                     wait_seconds=SNAPSHOT_CONSUMER_WAIT_SECONDS)
        conn.send(("stats", stats))
    except (OperatorError, RegistryUnavailable) as e:
        conn.send(("error", str(e)))
    except KafkaException as e:
        conn.send(("error", f"Kafka error: {e.args[0].str() if e.args else e}"))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise


def consumer_ids(instance_id: str | None, count: int) -> list[str | None]:
    """Instance ids of the snapshot's consumers (each needs its own transactional id)."""
    if count == 1:
        return [instance_id]
    import socket

    base = instance_id or socket.gethostname()
    return [f"{base}-{i + 1}" for i in range(count)]


def run_snapshot(cfg: ConnectorConfig, reader: Callable[[], MlflowReader], stop: threading.Event,
                 instance_id: str | None, consumers: int,
                 topics: Callable[[], object] | None = None) -> SnapshotResult:
    """`reader` makes the MLflow reader (and checks MLflow), once the consumers are forked; `topics`
    (connector.kafka.topics.ensure_topics) checks Kafka and makes the topics meanwhile, in a thread, so
    that the first MLflow request does not wait for Kafka; the consumers start once it is done. A Kafka
    problem is reported before an MLflow problem."""
    started = time.monotonic()
    fork = multiprocessing.get_context("fork")
    gc.collect()  # no Kafka client of start-up may be left for the children
    topics_ready = fork.Event()
    if topics is None:
        topics_ready.set()
    children: list[tuple[BaseProcess, Connection]] = []
    for child_id in consumer_ids(instance_id, consumers):
        conn, child_conn = fork.Pipe()
        child = fork.Process(target=_consume, args=(cfg, child_id, child_conn, topics_ready),
                             name=f"mlflow-datahub-consumer-{len(children) + 1}", daemon=True)
        child.start()
        child_conn.close()
        children.append((child, conn))
    positions: dict[int, int] = {}  # the furthest each partition was committed, by any consumer
    reports: dict[int, tuple[str, object]] = {}
    moved = threading.Condition()  # notified when positions move or a consumer reports

    def collect() -> None:
        """Reads the consumers' messages until each has made its final report; a failed consumer
        stops the snapshot."""
        while len(reports) < len(children):
            waiting = {c: i for i, (_, c) in enumerate(children) if i not in reports}
            for conn in multiprocessing.connection.wait(list(waiting), 0.5):
                i = waiting[conn]  # type: ignore[index]
                try:
                    what, payload = conn.recv()  # type: ignore[union-attr]
                except EOFError:  # gone without a word; its exit code comes once it is reaped
                    children[i][0].join(5)
                    what, payload = "error", f"consumer process {i + 1} exited with code {children[i][0].exitcode}"
                with moved:
                    if what == "positions":
                        for partition, offset in payload.items():
                            positions[partition] = max(positions.get(partition, 0), offset)
                    else:
                        reports[i] = (what, payload)
                        if what == "error":
                            stop.set()
                    moved.notify_all()

    collector = threading.Thread(target=collect, name="consumer-reports", daemon=True)
    collector.start()
    try:
        made: list[BaseException | None] = []

        def make_topics() -> None:
            try:
                if topics is not None:
                    topics()
                topics_ready.set()
                made.append(None)
            except BaseException as e:  # raised below, before any MLflow problem
                made.append(e)

        maker = threading.Thread(target=make_topics, name="topics", daemon=True)
        maker.start()
        try:
            mlflow = reader()
        finally:
            maker.join()
            if made and made[0] is not None:
                raise made[0]
        from connector.pipeline.producer import ChangeProducer

        def consumed(ends: dict[int, int]) -> None:
            with moved:  # woken by each report; the timeout lets a stop by signal be seen
                while not stop.is_set() and not all(positions.get(p, 0) > o for p, o in ends.items()):
                    moved.wait(0.2)

        producer = ChangeProducer(cfg, mlflow)
        try:
            summary = producer.snapshot(stop)
            consumed(summary.end_offsets)
            snapshot_seconds = time.monotonic() - started
            if not stop.is_set():
                log.info("snapshot %s: every MCP of it acknowledged (%.1f s)", summary.snapshot_id, snapshot_seconds)
            features = None
            if summary.complete and summary.signatures_unread and not stop.is_set():
                before = dict(producer.written_offsets)
                features = producer.read_features(stop)  # each step committed: acknowledged by Kafka
                consumed({p: o for p, o in producer.written_offsets.items() if before.get(p) != o})
        finally:
            producer.close()
    finally:
        for i, (_, conn) in enumerate(children):
            if i not in reports:
                try:
                    conn.send(None)
                except OSError:  # that consumer is gone; its EOF is its report
                    pass
        collector.join(STOP_SECONDS)
        for i, (child, _) in enumerate(children):
            if i not in reports:  # it did not answer: its batch in flight was not acknowledged
                child.kill()
                reports[i] = ("error", f"consumer process {i + 1} did not stop within {STOP_SECONDS:.0f} s; "
                                       "killed (what it had not committed is read again by the next consumer)")
        collector.join(10)
        for child, conn in children:
            child.join(30)
            conn.close()
    errors = [str(payload) for what, payload in reports.values() if what == "error"]
    if errors:
        raise SnapshotFailed("consumer: " + "; ".join(errors))
    if stop.is_set():
        raise SnapshotFailed("snapshot interrupted")
    return SnapshotResult(summary, _total([payload for _, payload in reports.values()]),  # type: ignore[misc]
                          features, snapshot_seconds)


def _total(parts: list[ConsumerStats]) -> ConsumerStats:
    from connector.pipeline.consumer import ConsumerStats

    total = ConsumerStats()
    for part in parts:
        total.add(part)
    return total
