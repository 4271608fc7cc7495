"""Scope on a real MLflow and Kafka: `experiment_pattern`, `model_pattern` and `max_run_age_days` apply
alike to snapshots, incremental cycles, targeted (webhook) reads and deletions, and what leaves the scope
is soft-deleted as stale; `platform_instance` reaches every URN."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from datahub.metadata.urns import Urn
from mlflow import MlflowClient

from connector.contract import codec
from connector.datahub.mapping import MappingSettings, experiment_urn, model_group_urn
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, read_to_end
from tests.integration.test_deletions import consume_until, mcps, removals

DAY_MS = 24 * 3600 * 1000


def _keys(kafka: Kafka, topic: str) -> Counter[tuple[str, str]]:
    """(op, key) of the topic's events, counted (the topic is read partition by partition, so the order of
    events in different partitions says nothing: what is new is a difference of counts)."""
    return Counter((e["op"], e["key"]) for e in (codec.decode(m.value()) for m in read_to_end(kafka.bootstrap, topic))
                   if e["kind"] != "SNAPSHOT")


def test_scope_in_snapshots_cycles_targeted_reads_and_deletions(own_mlflow: MlflowServer, kafka: Kafka,
                                                                 make_config: ConfigFactory) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    keep = client.create_experiment("keep/a")
    drop = client.create_experiment("drop/b")
    kept_run = client.create_run(keep, run_name="kept").info.run_id
    old_run = client.create_run(keep, run_name="old", start_time=int(time.time() * 1000) - 40 * DAY_MS).info.run_id
    dropped_run = client.create_run(drop, run_name="dropped").info.run_id
    for name in ("keep model", "drop model"):
        client.create_registered_model(name)
        client.create_model_version(name, f"runs:/{kept_run}/m", run_id=kept_run)
    scope: dict[str, Any] = {"experiment_pattern": {"allow": ["^keep/"]}, "model_pattern": {"deny": ["^drop"]},
                             "max_run_age_days": 30, "platform_instance": "eu",
                             "stateful_ingestion": {"enabled": True, "fail_safe_threshold": 100}}
    _, cfg = make_config(own_mlflow.uri, {"source": {"config": scope}, "producer": {"watermark_overlap_seconds": 1}})
    ensure_topics(cfg)
    topic = cfg.kafka.topics.changes

    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    try:
        summary = producer.snapshot()
        assert summary.complete
        published = {key for _, key in _keys(kafka, topic)}
        assert {f"experiment:{keep}", f"run:{kept_run}", "registered_model:keep model",
                "model_version:keep model/1"} <= published
        assert not {f"experiment:{drop}", f"run:{dropped_run}", f"run:{old_run}", "registered_model:drop model",
                    "model_version:drop model/1"} & published
        consume_until(cfg, summary.end_offsets, "scope-1")

        # Incremental cycles and targeted reads: only what is in scope.
        before = _keys(kafka, topic)
        client.create_run(drop, run_name="also dropped")
        client.create_model_version("drop model", f"runs:/{kept_run}/m2", run_id=kept_run)
        time.sleep(1.2)
        producer.cycle()
        producer.refresh_model(["drop model"])
        new = _keys(kafka, topic) - before
        assert all("drop" not in key for _, key in new), new
        fresh = client.create_run(keep, run_name="fresh").info.run_id
        time.sleep(1.2)
        producer.cycle()
        assert ("CREATE", f"run:{fresh}") in _keys(kafka, topic) - before
    finally:
        producer.close()

    # Every URN written parses, and carries the platform instance where DataHub's URNs can.
    settings = MappingSettings(platform_instance="eu")
    records = mcps(kafka, cfg)
    for urn, _, _ in records:
        Urn.from_string(urn)
    urns = {urn for urn, _, _ in records}
    assert model_group_urn("keep model", settings) in urns and experiment_urn("keep/a", "eu") in urns
    assert experiment_urn("keep/a") not in urns

    # The scope narrows: "keep model" leaves it. The next snapshot treats it as stale.
    narrower = {**scope, "model_pattern": {"deny": ["^drop", "^keep"]}}
    _, cfg2 = make_config(own_mlflow.uri, {"source": {"config": narrower}})
    cfg2 = cfg2.model_copy(update={"kafka": cfg.kafka})
    producer = ChangeProducer(cfg2, MlflowReader(reader_settings(cfg2)))
    try:
        summary = producer.snapshot()
    finally:
        producer.close()
    assert summary.complete and summary.deletes == 2, summary  # the model and its version
    consume_until(cfg2, summary.end_offsets, "scope-2")
    removed = removals(mcps(kafka, cfg))
    assert model_group_urn("keep model", settings) in removed
    assert experiment_urn("keep/a", "eu") not in removed
