"""Integration: deleted entities ("Detect Deleted Entities") on the real stack.

* MLflow deletes, restores, renames and hard deletes, driven through `mlflow-datahub snapshot`
  (each run a new process, so the consumer's state is rebuilt from the state topic every time);
* the consumer's own stale-entity check at the end of a complete snapshot, with change events
  written directly to the change topic (no DELETE events), its guards (incomplete snapshot, END
  without BEGIN, fail-safe threshold) and a restart;
* an interrupted and a failed listing of the real producer delete nothing;
* two `consume` instances in one group each decide for their own partitions, and one takes over
  the other's partitions (state restored from the state topic) after it is stopped.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from datahub.metadata.schemas import getMetadataChangeProposalSchema
from mlflow import MlflowClient

from connector.config import ConnectorConfig
from connector.contract import codec, envelope
from connector.contract.events import ChangeEvent, EntityKind, entity_key
from connector.datahub.mapping import MappingSettings, experiment_urn, model_group_urn, model_urn, run_urn
from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.kafka.topics import ensure_topics
from connector.mlflow import entities as changes
from connector.mlflow.reader import MlflowReader, ReaderSettings, reader_settings
from connector.pipeline.consumer import ChangeConsumer
from connector.pipeline.producer import ChangeProducer, SnapshotSummary
from tests import mlflow_objects as mo
from tests.conftest import REPO, ConfigFactory, Kafka, read_to_end, run_cli

SETTINGS = MappingSettings()
MCP_SCHEMA = fastavro.parse_schema(json.loads(getMetadataChangeProposalSchema()))
REMOVED = {"removed": True}
LIVE = {"removed": False}

# ---- reading the topics -----------------------------------------------------------------------


def mcps(kafka: Kafka, cfg: ConnectorConfig) -> list[tuple[str, str, Any]]:
    """(URN, aspect name, aspect JSON) of every record on the MCP topic, in order."""
    out = []
    for msg in read_to_end(kafka.bootstrap, cfg.kafka.topics.mcp):
        value = msg.value()
        magic, _ = struct.unpack(">bI", value[:5])
        assert magic == 0
        mcp = fastavro.schemaless_reader(io.BytesIO(value[5:]), MCP_SCHEMA, MCP_SCHEMA)
        assert msg.key().decode() == mcp["entityUrn"]
        out.append((mcp["entityUrn"], mcp["aspectName"], json.loads(mcp["aspect"]["value"])))
    return out


def removals(records: Iterable[tuple[str, str, Any]]) -> Counter[str]:
    return Counter(urn for urn, aspect, value in records if aspect == "status" and value == REMOVED)


def aspect_values(records: Iterable[tuple[str, str, Any]], urn: str, aspect: str) -> list[Any]:
    return [value for u, a, value in records if u == urn and a == aspect]


def state_records(kafka: Kafka, cfg: ConnectorConfig) -> list[tuple[int, str, dict[str, Any] | None]]:
    return [(m.partition(), m.key().decode(), json.loads(m.value()) if m.value() is not None else None)
            for m in read_to_end(kafka.bootstrap, cfg.kafka.topics.state)]


def tombstones(kafka: Kafka, cfg: ConnectorConfig) -> Counter[str]:
    return Counter(key for _, key, value in state_records(kafka, cfg) if value is None and key != "__snapshot__")


def snapshot(path: Path) -> str:
    result = run_cli("snapshot", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "complete" in result.stdout
    return result.stdout + result.stderr


# ---- MLflow deletes, restores, renames, hard deletes ------------------------------------------


def _run(client: MlflowClient, experiment_id: str, name: str) -> str:
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    client.log_param(run_id, "alpha", "0.5")
    client.set_terminated(run_id)
    return run_id


@pytest.mark.filterwarnings("ignore:.*transition_model_version_stage.*:FutureWarning")
def test_mlflow_deletes_restores_and_renames_reach_datahub(own_mlflow: MlflowServer, kafka: Kafka,
                                                           make_config: ConfigFactory) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    kept = client.create_experiment("deletions/kept")
    doomed = client.create_experiment("deletions/deleted and restored")
    renamed = client.create_experiment("deletions/old name")
    producing = _run(client, kept, "producing run")
    toggled = _run(client, kept, "deleted and restored run")
    in_doomed = _run(client, doomed, "run of a deleted experiment")
    in_renamed = _run(client, renamed, "run of a renamed experiment")
    model, doomed_model = "deletions model", "deletions doomed model"
    client.create_registered_model(model)
    client.create_registered_model(doomed_model)
    for name in (model, model, doomed_model):
        client.create_model_version(name, source=f"runs:/{producing}/model", run_id=producing)
    client.transition_model_version_stage(model, "2", "Staging")
    v1, v2, doomed_v1 = model_urn(model, "1", SETTINGS), model_urn(model, "2", SETTINGS), model_urn(
        doomed_model, "1", SETTINGS)
    group, doomed_group = model_group_urn(model, SETTINGS), model_group_urn(doomed_model, SETTINGS)
    old_name, new_name = experiment_urn("deletions/old name"), experiment_urn("deletions/new name")
    live = [experiment_urn("deletions/kept"), run_urn(producing), run_urn(in_renamed), v1, group]

    path, cfg = make_config(own_mlflow.uri)
    # 1. Everything exists.
    snapshot(path)
    first = mcps(kafka, cfg)
    for urn in [*live, v2, doomed_v1, doomed_group, old_name, run_urn(toggled), run_urn(in_doomed)]:
        assert aspect_values(first, urn, "status") == [LIVE], urn
    assert {e["destinationUrn"] for e in aspect_values(first, run_urn(producing), "dataProcessInstanceOutput")[-1][
        "outputEdges"]} == {v1, v2, doomed_v1}
    assert aspect_values(first, group, "mlModelGroupProperties")[-1]["version"]["versionTag"] == "2"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, cfg.kafka.topics.state)
    assert admin.describe_configs([resource])[resource].result(30)["cleanup.policy"].value == "compact"

    # 2. MLflow soft deletes (experiment with its runs, a run), hard deletes (a version, a model
    #    with its version) and a rename.
    client.delete_experiment(doomed)
    client.delete_run(toggled)
    client.delete_model_version(model, "2")
    client.delete_registered_model(doomed_model)
    client.rename_experiment(renamed, "deletions/new name")
    out = snapshot(path)
    assert "(deletes: 3)" in out, out  # the version, the model and the model's version
    second = mcps(kafka, cfg)[len(first):]
    deleted_in_mlflow = [experiment_urn("deletions/deleted and restored"), run_urn(in_doomed), run_urn(toggled)]
    hard_deleted = [v2, doomed_group, doomed_v1]
    assert removals(second) == Counter({urn: 1 for urn in [*deleted_in_mlflow, *hard_deleted, old_name]})
    # What depended on the deleted version is brought up to date.
    assert aspect_values(second, v2, "globalTags") == [{"tags": []}]
    assert aspect_values(second, doomed_v1, "globalTags") == [{"tags": []}]
    outputs = aspect_values(second, run_urn(producing), "dataProcessInstanceOutput")
    assert [e["destinationUrn"] for e in outputs[-1]["outputEdges"]] == [v1]
    assert aspect_values(second, group, "mlModelGroupProperties")[-1]["version"]["versionTag"] == "1"
    # The renamed experiment: a new container, and its run moved into it.
    assert aspect_values(second, new_name, "status") == [LIVE]
    assert aspect_values(second, run_urn(in_renamed), "container") == [{"container": new_name}]
    # Soft deletes decided by the connector tombstone the URN's state; MLflow's own soft deletes
    # are entity state (kept, with removed=true).
    assert tombstones(kafka, cfg) == Counter({urn: 1 for urn in [*hard_deleted, old_name]})

    # 3. Restores in MLflow: removed=false again.
    client.restore_experiment(doomed)
    client.restore_run(toggled)
    snapshot(path)
    third = mcps(kafka, cfg)[len(first) + len(second):]
    assert removals(third) == Counter()
    for urn in deleted_in_mlflow:
        assert aspect_values(third, urn, "status") == [LIVE], urn

    # 4. Nothing changed: a new consumer process, its state restored, writes nothing.
    out = snapshot(path)
    assert re.search(r"MCPs acknowledged on \S+: 0 \(unchanged aspects skipped: [1-9]", out), out
    everything = mcps(kafka, cfg)
    assert len(everything) == len(first) + len(second) + len(third)
    assert all(removals(everything)[urn] == 0 for urn in live)
    assert max(removals(everything).values()) == 1, "every soft delete written once"


class StopAfter(threading.Event):
    """A stop signal that turns on after it was asked `calls` times: interrupts a listing midway."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls < 0 or super().is_set()


def consume_until(cfg: ConnectorConfig, ends: dict[int, int], instance: str, timeout: float = 120) -> ChangeConsumer:
    """Run a consumer in this process until it has committed past `ends` (partition -> offset)."""
    consumer = ChangeConsumer(cfg, instance)
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        consumer.run(stop, should_stop=lambda c: all(c.positions.get(p, 0) > o for p, o in ends.items()))
    finally:
        timer.cancel()
    assert not stop.is_set(), f"consumer did not reach {ends} in {timeout:.0f} s (at {consumer.positions})"
    return consumer


def snapshot_in_process(cfg: ConnectorConfig, name: str, reader: MlflowReader | None = None,
                        stop: threading.Event | None = None) -> SnapshotSummary:
    """A snapshot by the real producer, then a new consumer (state restored from the state topic)
    until it has committed the snapshot's END markers: what the `snapshot` command does."""
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, reader or MlflowReader(reader_settings(cfg, retry_for_seconds=60)))
    summary = producer.snapshot(stop)
    producer.close()
    consume_until(cfg, summary.end_offsets, name)
    return summary


def test_without_stateful_ingestion_nothing_is_soft_deleted(own_mlflow: MlflowServer, kafka: Kafka,
                                                            make_config: ConfigFactory,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Decision: MLflow's own soft deletes of experiments and runs are entity state, mirrored as
    status removed=true whatever the policy; deletions the connector would decide are not made."""
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    experiment = client.create_experiment("stateless/deleted in mlflow")
    run_id = _run(client, experiment, "stateless run")
    client.create_registered_model("stateless model")
    client.create_model_version("stateless model", source=f"runs:/{run_id}/model", run_id=run_id)
    _, cfg = make_config(own_mlflow.uri, {"source": {"config": {"stateful_ingestion": {"enabled": False}}}})
    caplog.set_level(logging.INFO)
    assert snapshot_in_process(cfg, "stateless-1").complete
    mirrored = removals(mcps(kafka, cfg))  # other tests' experiments and runs deleted in MLflow
    client.delete_model_version("stateless model", "1")
    client.delete_experiment(experiment)
    summary = snapshot_in_process(cfg, "stateless-2")
    assert summary.complete and summary.deletes == 1
    assert "model_version:stateless model/1 is gone from MLflow; stateful_ingestion.enabled is false: " \
           "nothing deleted" in caplog.text
    records = mcps(kafka, cfg)
    assert removals(records) == mirrored + Counter({experiment_urn("stateless/deleted in mlflow"): 1,
                                                    run_urn(run_id): 1})
    assert aspect_values(records, model_urn("stateless model", "1", SETTINGS), "globalTags") == [
        {"tags": [{"tag": "urn:li:tag:mlflow_none"}]}]
    assert tombstones(kafka, cfg) == Counter()


def test_interrupted_or_failed_listing_deletes_nothing(own_mlflow: MlflowServer, kafka: Kafka,
                                                       make_config: ConfigFactory,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    experiment = client.create_experiment("incomplete/experiment")
    run_id = _run(client, experiment, "incomplete run")
    client.create_registered_model("incomplete model")
    client.create_model_version("incomplete model", source=f"runs:/{run_id}/model", run_id=run_id)
    gone = model_urn("incomplete model", "1", SETTINGS)
    # A threshold of 100 disables the fail-safe: only completeness guards these snapshots.
    _, cfg = make_config(own_mlflow.uri, {"source": {"config": {"stateful_ingestion": {
        "enabled": True, "fail_safe_threshold": 100}}}})
    assert snapshot_in_process(cfg, "complete-1").complete
    # Other tests' experiments and runs that MLflow marks deleted are mirrored as removed=true.
    mirrored = removals(mcps(kafka, cfg))
    assert gone not in mirrored
    client.delete_model_version("incomplete model", "1")

    caplog.set_level(logging.INFO)
    dead = f"http://127.0.0.1:{free_port()}"
    readers = {
        "interrupted": (MlflowReader(reader_settings(cfg)), StopAfter(3)),
        "failed": (MlflowReader(ReaderSettings(dead, dead, retry_for_seconds=0)), None),
    }
    summaries = []
    for what, (reader, stop) in readers.items():
        summaries.append(snapshot_in_process(cfg, what, reader, stop))
        assert not summaries[-1].complete and summaries[-1].deletes == 0, what
    assert summaries[0].events == 3 and summaries[1].events == 0
    assert removals(mcps(kafka, cfg)) == mirrored
    assert tombstones(kafka, cfg) == Counter()
    for summary in summaries:
        assert f"snapshot {summary.snapshot_id} is incomplete: no stale-entity check" in caplog.text
    # The same deletion is made by the next complete snapshot.
    assert snapshot_in_process(cfg, "complete-2").deletes == 1
    assert removals(mcps(kafka, cfg)) == mirrored + Counter({gone: 1})
    assert tombstones(kafka, cfg) == Counter({gone: 1})


# ---- the consumer's stale check, with change events written directly --------------------------


def _experiment(n: int) -> tuple[EntityKind, Any]:
    return "EXPERIMENT", changes.experiment_state(mo.experiment(str(n), f"direct/experiment {n}"))


def _version(n: int) -> tuple[EntityKind, Any]:
    return "MODEL_VERSION", changes.model_version_state(
        mo.model_version("direct model", str(n), stage="Staging", run_id=None), [], None)


def primary_urn(kind: EntityKind, state: Any) -> str:
    if kind == "EXPERIMENT":
        return experiment_urn(state["name"])
    return model_urn(state["name"], state["version"], SETTINGS)


# At least 4 entities in each of the 3 partitions (checked by the tests); versions first, so that
# the first entity gone from a partition is a model version where there is one.
ENTITIES = [_version(n) for n in range(1, 4)] + [_experiment(n) for n in range(1, 16)]


def snapshot_events(snapshot_id: str, entities: list[tuple[EntityKind, Any]], partitions: int = 3,
                    complete: bool = True, begin: bool = True) -> list[tuple[ChangeEvent, int | None]]:
    """What the producer writes for a snapshot: BEGIN on every partition, READ events (partitioned
    by key), END on every partition."""
    source = envelope.source_block("http://mlflow.test", "http://mlflow.test", mo.READ_AT_MS, snapshot_id)
    markers = [(envelope.snapshot_marker(op, snapshot_id, partitions, source, mo.READ_AT_MS, complete,  # type: ignore[arg-type]
                                        len(entities)), p)
               for op in ("SNAPSHOT_BEGIN", "SNAPSHOT_END") for p in range(partitions)]
    reads: list[tuple[ChangeEvent, int | None]] = [
        (envelope.entity_changed("READ", kind, state, source, mo.READ_AT_MS), None) for kind, state in entities]
    return (markers[:partitions] if begin else []) + reads + markers[partitions:]


class Published:
    def __init__(self) -> None:
        self.partition_of: dict[str, int] = {}
        self.ends: dict[int, int] = {}


def publish(kafka: Kafka, cfg: ConnectorConfig, events: list[tuple[ChangeEvent, int | None]]) -> Published:
    """Write change events as the producer does (same key partitioner); returns where they went."""
    out = Published()
    errors: list[str] = []
    topic = cfg.kafka.topics.changes
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    deadline = time.monotonic() + 30
    while len(producer.list_topics(topic, timeout=10).topics[topic].partitions) < cfg.kafka.partitions:
        assert time.monotonic() < deadline, f"{topic} has not got its {cfg.kafka.partitions} partitions"
        time.sleep(0.2)

    def delivered(error: Any, msg: Any) -> None:
        if error is not None:
            errors.append(str(error))
            return
        out.partition_of[msg.key().decode()] = msg.partition()
        out.ends[msg.partition()] = max(out.ends.get(msg.partition(), -1), msg.offset())

    for event, partition in events:
        producer.produce(topic, key=event["key"].encode(), value=codec.encode(event),
                         on_delivery=delivered, **({} if partition is None else {"partition": partition}))
    assert producer.flush(30) == 0
    assert errors == []
    return out


def gone_per_partition(partition_of: dict[str, int], count: int = 1) -> set[str]:
    """`count` keys of every partition that holds more than `count` entities (so that no partition
    loses more than half of them: the fail-safe stays out of the way)."""
    by_partition: dict[int, list[str]] = {}
    for kind, state in ENTITIES:
        key = entity_key(kind, state)
        if key in partition_of:
            by_partition.setdefault(partition_of[key], []).append(key)
    return {key for keys in by_partition.values() if len(keys) > 2 * count for key in keys[:count]}


def without(keys: set[str]) -> list[tuple[EntityKind, Any]]:
    return [(kind, state) for kind, state in ENTITIES if entity_key(kind, state) not in keys]


def urns(keys: set[str]) -> set[str]:
    return {primary_urn(kind, state) for kind, state in ENTITIES if entity_key(kind, state) in keys}


def test_consumer_soft_deletes_what_a_complete_snapshot_did_not_see(kafka: Kafka, make_config: ConfigFactory,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    path, cfg = make_config("http://mlflow.test")
    ensure_topics(cfg)
    caplog.set_level(logging.INFO)
    first = publish(kafka, cfg, snapshot_events("s1", ENTITIES))
    consume_until(cfg, first.ends, "stale-1")
    written = mcps(kafka, cfg)
    assert removals(written) == Counter()
    gone = gone_per_partition(first.partition_of)
    assert len(gone) == 3, first.partition_of
    assert any(key.startswith("model_version:") for key in gone)

    # Guards: an incomplete snapshot, an END without its BEGIN, then an empty complete snapshot
    # (every partition loses 100% > 75%): nothing is deleted, and each reason is logged.
    guarded = publish(kafka, cfg, snapshot_events("s2", without(gone), complete=False)
                      + snapshot_events("s3", without(gone), begin=False) + snapshot_events("s4", []))
    consume_until(cfg, guarded.ends, "stale-2")
    assert removals(mcps(kafka, cfg)) == Counter()
    assert tombstones(kafka, cfg) == Counter()
    log = caplog.text
    assert log.count("snapshot s2 is incomplete: no stale-entity check") >= 3
    assert log.count("snapshot s3 ended without its beginning in this partition") >= 3
    assert len(re.findall(r"snapshot s4: (\d+) of \1 entities \(100%\) would be soft-deleted, more than "
                          r"fail_safe_threshold 75%: nothing deleted", log)) >= 3

    # A complete snapshot without some entities, read by a restarted consumer: they are soft-deleted.
    deleting = publish(kafka, cfg, snapshot_events("s5", without(gone)))
    consume_until(cfg, deleting.ends, "stale-3")
    after = mcps(kafka, cfg)
    assert removals(after) == Counter({urn: 1 for urn in urns(gone)})
    for urn in urns(gone):
        if urn.startswith("urn:li:mlModel:"):
            assert aspect_values(after, urn, "globalTags")[-1] == {"tags": []}
    assert tombstones(kafka, cfg) == Counter({urn: 1 for urn in urns(gone)})
    # The same snapshot again: nothing is written at all (no second soft delete, no rewrite).
    again = publish(kafka, cfg, snapshot_events("s6", without(gone)))
    consume_until(cfg, again.ends, "stale-4")
    assert mcps(kafka, cfg) == after


# ---- several consumer instances ---------------------------------------------------------------


class Instance:
    """A `mlflow-datahub consume` process with its log in a file."""

    def __init__(self, path: Path, name: str, logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self.stderr = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "consume", "-c", str(path), "--instance-id", name],
            stdout=subprocess.DEVNULL, stderr=self.stderr, cwd=REPO, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def partitions(self) -> set[int] | None:
        """The partitions of its latest assignment (None before the first)."""
        found = re.findall(r"state restored for partitions \[([\d, ]*)\]", self.text())
        return {int(p) for p in found[-1].split(",") if p.strip()} if found else None

    def soft_deleted(self) -> list[str]:
        return re.findall(r"did not see .*?: (urn:li:.*) soft-deleted$", self.text(), re.MULTILINE)

    def stop(self) -> int:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    return self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            return self.process.wait(10)
        finally:
            self.stderr.close()


def wait_for(what: str, condition: Callable[[], bool], instances: list[Instance], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        for i in instances:
            assert i.process.poll() is None, f"{i.name} exited:\n{i.text()[-3000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n" + "\n".join(
            f"--- {i.name}\n{i.text()[-2000:]}" for i in instances)
        time.sleep(0.5)


def committed_past(cfg: ConnectorConfig, kafka: Kafka, ends: dict[int, int]) -> Callable[[], bool]:
    """True once the group has committed offsets past `ends` (its transactions are done)."""

    def check() -> bool:
        reader = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": cfg.kafka.consumer_group,
                           "enable.auto.commit": False})
        try:
            offsets = reader.committed([TopicPartition(cfg.kafka.topics.changes, p) for p in ends], timeout=10)
        finally:
            reader.close()
        return all(tp.offset > ends[tp.partition] for tp in offsets)

    return check


def test_two_instances_decide_for_their_own_partitions_and_take_over(kafka: Kafka, make_config: ConfigFactory,
                                                                     tmp_path: Path) -> None:
    path, cfg = make_config("http://mlflow.test")
    ensure_topics(cfg)
    a, b = Instance(path, "instance-a", tmp_path), Instance(path, "instance-b", tmp_path)
    instances = [a, b]
    try:
        def split() -> bool:
            pa, pb = a.partitions(), b.partitions()
            return bool(pa and pb and not pa & pb and pa | pb == {0, 1, 2})

        wait_for("both instances to share the 3 partitions", split, instances)
        first = publish(kafka, cfg, snapshot_events("m1", ENTITIES))
        wait_for("snapshot m1 to be consumed", committed_past(cfg, kafka, first.ends), instances)
        assert removals(mcps(kafka, cfg)) == Counter()

        gone = gone_per_partition(first.partition_of)
        assert len(gone) == 3, first.partition_of
        deleting = publish(kafka, cfg, snapshot_events("m2", without(gone)))
        wait_for("snapshot m2 to be consumed", committed_past(cfg, kafka, deleting.ends), instances)
        assert removals(mcps(kafka, cfg)) == Counter({urn: 1 for urn in urns(gone)})
        # Each deletion was decided by the instance that owns the entity's partition.
        owner = {p: i for i in instances for p in i.partitions() or ()}
        for kind, state in ENTITIES:
            key, urn = entity_key(kind, state), primary_urn(kind, state)
            if key in gone:
                assert owner[first.partition_of[key]].soft_deleted().count(urn) == 1, urn
                assert sum(i.soft_deleted().count(urn) for i in instances) == 1, urn
        assert all(i.soft_deleted() for i in instances), "both instances had deletions to decide"

        # Instance b stops; a takes its partitions over and restores their state from the state topic.
        assert b.stop() == 0, b.text()[-2000:]
        wait_for("instance a to own every partition", lambda: a.partitions() == {0, 1, 2}, [a])
        further = gone | gone_per_partition({k: p for k, p in first.partition_of.items() if k not in gone})
        assert len(further - gone) == 3
        before = len(mcps(kafka, cfg))
        later = publish(kafka, cfg, snapshot_events("m3", without(further)))
        wait_for("snapshot m3 to be consumed", committed_past(cfg, kafka, later.ends), [a])
        records = mcps(kafka, cfg)
        assert removals(records) == Counter({urn: 1 for urn in urns(further)})
        assert sorted(a.soft_deleted()[-len(further - gone):]) == sorted(urns(further - gone))
        # The live entities were deduplicated by the restored state: m3 wrote soft deletes only.
        m3 = records[before:]
        assert {urn for urn, _, _ in m3} == urns(further - gone)
        assert {aspect for _, aspect, _ in m3} <= {"status", "globalTags"}
    finally:
        for instance in instances:
            instance.stop()
