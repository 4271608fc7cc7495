"""The operations endpoint of `run`, `produce` and `consume` (`metrics.listen`): what each process checks
for `/readyz` (the dependencies it uses), served by `connector.observability.http`."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka.admin import AdminClient

from connector.config import ConnectorConfig
from connector.observability.http import HEARTBEATS, OperationsServer, Readiness


def dependency_checks(cfg: ConnectorConfig, mlflow: bool, registry: bool) -> dict[str, Callable[[], None]]:
    """A check per dependency the process uses: each raises when its dependency does not answer."""
    from connector.kafka.clients import KafkaConnection

    connection = KafkaConnection(cfg.kafka)
    admin = connection.admin()
    checks: dict[str, Callable[[], None]] = {}
    if mlflow:
        from connector.mlflow.reader import MlflowReader, reader_settings

        reader = MlflowReader(reader_settings(cfg, retry_for_seconds=0))
        checks["MLflow"] = reader.check
    checks["Kafka"] = lambda: _kafka_answers(admin)
    if registry:
        client = connection.schema_registry()
        checks["schema registry"] = lambda: client.get_subjects() and None
    return checks


def _kafka_answers(admin: AdminClient) -> None:
    admin.list_topics(timeout=5)


def serve(cfg: ConnectorConfig, mlflow: bool, registry: bool) -> OperationsServer | None:
    """The operations endpoint of `run`, `produce` or `consume`, when `metrics` is configured."""
    if cfg.metrics is None:
        return None
    m = cfg.metrics
    readiness = Readiness(dependency_checks(cfg, mlflow, registry), m.check_interval_seconds).start()
    return OperationsServer(m.listen_address(), HEARTBEATS, readiness, m.stall_seconds).start()
