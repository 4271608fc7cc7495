"""Weeks of running: a restart reads what it needs (the position and one summary per published entity,
in the compacted producer-offsets topic), not the change topic's history, so it costs the same after one
snapshot or after hundreds. A producer of an earlier version, without summaries, is read once from the
change topic."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer
from mlflow import MlflowClient

from connector.config import ConnectorConfig
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.position import known_prefix, position_key
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, read_to_end


def _summaries(kafka: Kafka, cfg: ConnectorConfig) -> list[tuple[bytes, bytes | None]]:
    prefix = known_prefix(cfg)
    return [(m.key(), m.value()) for m in read_to_end(kafka.bootstrap, cfg.kafka.topics.producer_offsets)
            if m.key().startswith(prefix)]


def _producer(cfg: ConnectorConfig) -> ChangeProducer:
    return ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))


@pytest.fixture(scope="module")
def content(own_mlflow: MlflowServer) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    experiment = client.create_experiment("restart")
    runs = [client.create_run(experiment, run_name=f"run {n}").info.run_id for n in range(5)]
    for run_id in runs[:4]:
        client.set_terminated(run_id)  # the fifth stays active
    client.create_registered_model("restart model")
    client.create_model_version("restart model", f"runs:/{runs[0]}/model", run_id=runs[0])


def test_a_restart_reads_one_summary_per_entity_however_many_snapshots(
        own_mlflow: MlflowServer, content: None, make_config: ConfigFactory, kafka: Kafka) -> None:
    _, cfg = make_config(own_mlflow.uri)
    ensure_topics(cfg)
    first = _producer(cfg)
    for _ in range(4):
        assert first.snapshot().complete
    first.close()
    published = dict(first.published)
    assert len(published) >= 8  # experiments, runs, model, version
    # Unchanged entities wrote no new summary: one record per entity after four snapshots.
    assert len(_summaries(kafka, cfg)) == len(published)

    again = _producer(cfg)
    try:
        assert again.published == published
        assert again.known.active_runs == first.known.active_runs and len(again.known.active_runs) == 1
        assert again.known.versions_by_run == first.known.versions_by_run
        assert again.experiment_names == first.experiment_names
        assert again.position.snapshot_seq == 4
        assert again.cycle() == 0  # nothing is published again
    finally:
        again.close()


def test_a_producer_without_summaries_reads_the_change_topic_once(
        own_mlflow: MlflowServer, content: None, make_config: ConfigFactory, kafka: Kafka) -> None:
    _, cfg = make_config(own_mlflow.uri)
    ensure_topics(cfg)
    first = _producer(cfg)
    assert first.snapshot().complete
    first.close()
    # As an earlier version left it: change events and a position of its own, no summaries.
    old = Producer({"bootstrap.servers": kafka.bootstrap})
    for key, _ in _summaries(kafka, cfg):
        old.produce(cfg.kafka.topics.producer_offsets, key=key, value=None)
    earlier = {k: v for k, v in json.loads(first.position.to_json()).items()
               if k in ("snapshot_seq", "last_snapshot_ms", "watermarks", "partitions")}
    old.produce(cfg.kafka.topics.producer_offsets, key=position_key(cfg), value=json.dumps(earlier).encode())
    old.flush(30)

    upgraded = _producer(cfg)
    try:
        assert upgraded.published == first.published
        assert upgraded.known.versions_by_model == first.known.versions_by_model
        live = {key for key, value in _summaries(kafka, cfg)[-len(first.published):] if value is not None}
        assert len(live) == len(first.published)  # written again, for the next start
        assert upgraded.cycle() == 0
    finally:
        upgraded.close()
