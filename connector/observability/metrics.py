"""The connector's Prometheus metrics, modelled on Debezium's snapshot and streaming metrics.

Names follow Prometheus' conventions: one prefix (`mlflow_datahub_`), base units (seconds), `_total`
on counters (prometheus-client appends it), and no label with one value per MLflow object. The
metrics live in a registry of their own (`METRICS.registry`), served by `connector.observability.http`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from connector import __version__

PREFIX = "mlflow_datahub"


class ConnectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(f"{PREFIX}_build_info", "The connector's version (always 1).", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        # Producer (Debezium: TotalNumberOfEventsSeen, SnapshotRunning, SnapshotCompleted, ...)
        self.events_produced = Counter(f"{PREFIX}_events_produced", "Change events written to the change topic.",
                                       ["entity_type", "op"], registry=r)
        self.snapshot_running = Gauge(f"{PREFIX}_snapshot_running", "1 while a complete snapshot runs.", registry=r)
        self.snapshot_objects_read = Gauge(f"{PREFIX}_snapshot_objects_read",
                                           "Objects the running (or last) snapshot has read from MLflow.", registry=r)
        self.last_complete_snapshot = Gauge(f"{PREFIX}_last_complete_snapshot_timestamp_seconds",
                                            "When the last complete snapshot ended (Unix time).", registry=r)
        self.snapshot_duration = Gauge(f"{PREFIX}_snapshot_duration_seconds",
                                       "How long the last complete snapshot took.", registry=r)
        self.snapshots = Counter(f"{PREFIX}_snapshots", "Snapshots ended, complete or not.", ["outcome"], registry=r)
        self.mlflow_requests = Counter(f"{PREFIX}_mlflow_requests", "Requests to MLflow, by outcome (ok, retried: "
                                       "a transient failure that is retried, failed: given up).", ["outcome"],
                                       registry=r)
        # Replicas: which instance holds the producer role, and each instance's partitions
        self.producer_role = Gauge(f"{PREFIX}_producer_role", "1 while this instance holds the producer role, 0 while "
                                   "it stands by.", registry=r)
        self.producer_role_since = Gauge(f"{PREFIX}_producer_role_since_timestamp_seconds",
                                         "When this instance took the producer role (Unix time; 0 on a standby).",
                                         registry=r)
        self.producer_role_changes = Counter(f"{PREFIX}_producer_role_changes",
                                             "Times this instance took (taken) or gave up (released) the producer "
                                             "role.", ["change"], registry=r)
        self.assigned_partitions = Gauge(f"{PREFIX}_assigned_partition", "1 for each change-topic partition this "
                                         "instance's consumer holds.", ["partition"], registry=r)
        self.signature_warnings = Counter(f"{PREFIX}_signature_warnings",
                                          "Model versions published without features: their signature is absent, "
                                          "unreadable or unavailable (read once per version).", ["reason"],
                                          registry=r)
        self.signatures_unread = Gauge(f"{PREFIX}_signatures_unread", "Model versions whose signature the "
                                       "features pass (after a snapshot or start-up) has yet to read.", registry=r)
        self.skipped_objects = Counter(f"{PREFIX}_skipped_objects",
                                       "MLflow objects skipped after failing again and again.", registry=r)
        # Consumer (Debezium: MilliSecondsBehindSource, MilliSecondsSinceLastEvent; Connect: DLQ metrics)
        self.events_consumed = Counter(f"{PREFIX}_events_consumed", "Change events turned into MCPs.", registry=r)
        self.mcps_written = Counter(f"{PREFIX}_mcps_written", "MCPs written to DataHub's MCP topic.", ["aspect"],
                                    registry=r)
        self.unchanged_aspects = Counter(f"{PREFIX}_unchanged_aspects", "Aspects not written again: unchanged.",
                                         registry=r)
        self.soft_deletes = Counter(f"{PREFIX}_soft_deletes", "Entities soft-deleted in DataHub.", registry=r)
        self.dead_letters = Counter(f"{PREFIX}_dead_letters", "Change events sent to the dead-letter topic.",
                                    registry=r)
        self.consumer_lag = Gauge(f"{PREFIX}_consumer_lag_records",
                                  "Change events not yet consumed, over the partitions this process reads.", registry=r)
        self.source_lag = Gauge(f"{PREFIX}_source_lag_seconds",
                                "How long after its MLflow change the newest MCP was written.", registry=r)
        self.last_event = Gauge(f"{PREFIX}_last_event_timestamp_seconds",
                                "When the consumer last wrote a change event's MCPs (Unix time).", registry=r)

    # -- recording (one call per meaningful event; cheap) -------------------------------------------

    def produced(self, events: Iterable[tuple[str, str]]) -> None:
        """(entity type, op) of each change event committed to the change topic."""
        for kind, op in events:
            self.events_produced.labels(kind.lower(), op.lower()).inc()

    def producer_role_held(self, since_seconds: float) -> None:
        self.producer_role.set(1)
        self.producer_role_since.set(since_seconds)
        self.producer_role_changes.labels("taken").inc()

    def producer_role_standby(self) -> None:
        if self.producer_role._value.get():  # noqa: SLF001 (prometheus-client's value holder)
            self.producer_role_changes.labels("released").inc()
        self.producer_role.set(0)
        self.producer_role_since.set(0)

    def partitions_assigned(self, partitions: Iterable[int], held: bool) -> None:
        for p in partitions:
            if held:
                self.assigned_partitions.labels(str(p)).set(1)
            else:
                try:
                    self.assigned_partitions.remove(str(p))
                except KeyError:
                    pass

    def snapshot_ended(self, complete: bool, seconds: float) -> None:
        self.snapshot_running.set(0)
        self.snapshots.labels("complete" if complete else "incomplete").inc()
        if complete:
            self.last_complete_snapshot.set(time.time())
            self.snapshot_duration.set(seconds)

    def consumed(self, events: int, mcps: dict[str, int], unchanged: int, soft_deletes: int, dead_letters: int,
                 changed_at_ms: int | None) -> None:
        self.events_consumed.inc(events)
        for aspect, count in mcps.items():
            self.mcps_written.labels(aspect).inc(count)
        self.unchanged_aspects.inc(unchanged)
        self.soft_deletes.inc(soft_deletes)
        self.dead_letters.inc(dead_letters)
        if events:
            now = time.time()
            self.last_event.set(now)
            if changed_at_ms is not None:
                self.source_lag.set(max(0.0, now - changed_at_ms / 1000))


METRICS = ConnectorMetrics()
