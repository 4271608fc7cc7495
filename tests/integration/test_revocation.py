"""A partition revoked between fetching and processing (a rebalance inside consume()) is never processed
with an empty state: its fetched records are left to its next owner, and nothing of it is written."""

from __future__ import annotations

import threading
import time

from confluent_kafka import TopicPartition
from mlflow import MlflowClient

from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.reading import consume_batch
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.consumer import ChangeConsumer
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, read_to_end


def test_records_of_a_revoked_partition_are_not_processed(own_mlflow: MlflowServer, kafka: Kafka,
                                                          make_config: ConfigFactory) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    experiment = client.create_experiment("revocation")
    for n in range(12):
        client.create_run(experiment, run_name=f"run {n}")
    _, cfg = make_config(own_mlflow.uri)
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    assert producer.snapshot().complete
    producer.close()

    consumer = ChangeConsumer(cfg, "revocation")
    consumer.consumer.subscribe([cfg.kafka.topics.changes], on_assign=consumer._on_assign,
                                on_revoke=consumer._on_revoke)
    try:
        fetched = []
        deadline = time.monotonic() + 60
        while len({m.partition() for m in fetched}) < 2 and time.monotonic() < deadline:
            fetched += [m for m in consume_batch(consumer.consumer, 500, timeout=1.0) if not m.error()]
        partitions = sorted({m.partition() for m in fetched})
        assert len(partitions) >= 2 and set(consumer.states) >= set(partitions)
        revoked, kept = partitions[0], partitions[1:]
        # What librdkafka calls when a rebalance takes the partition away, after its records were fetched.
        consumer._on_revoke(consumer.consumer, [TopicPartition(cfg.kafka.topics.changes, revoked)])
        batch = consumer._of_assigned(fetched)
        assert batch and {m.partition() for m in batch} == set(kept)
        consumer._process_batch(batch, threading.Event())
        assert revoked not in consumer.positions and set(consumer.positions) == set(kept)
    finally:
        consumer.consumer.close()
    # Nothing of the revoked partition reached the state topic; the kept partitions' did.
    state_partitions = {m.partition() for m in read_to_end(kafka.bootstrap, cfg.kafka.topics.state)}
    assert revoked not in state_partitions and set(kept) <= state_partitions
