"""`mlflow-datahub replay` on the real stack: a replay into an empty MCP topic reproduces what the
original run wrote (from the beginning: everything, soft deletes included; from a timestamp: what
was written after it); it refuses to run beside a consumer of its group; bad arguments and topic
settings that break replay are reported in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import NewTopic
from mlflow import MlflowClient

from connector.config import ConnectorConfig, parse
from connector.datahub.mapping import MappingSettings, experiment_urn, model_urn, run_urn
from connector.devstack.demo import populate
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.clients import KafkaConnection
from connector.kafka.mcp_serde import McpDeserializer
from connector.kafka.topics import WEEK_MS, admin, ensure_topics, hazards, specs
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.producer import ChangeProducer
from connector.pipeline.replay import ReplayError, active_members, parse_timestamp
from tests.conftest import REPO, ConfigFactory, Kafka, read_to_end, run_cli

SETTINGS = MappingSettings()
UNUSED_MLFLOW = "http://127.0.0.1:9"  # for commands that stop before reading MLflow
Record = tuple[str, str, str, str]  # urn, aspect name, aspect JSON, system metadata JSON


# -- helpers --------------------------------------------------------------------------------------


def mcp_records(cfg: ConnectorConfig, since_ms: int = 0) -> list[Record]:
    """The MCP topic's committed records (with a record timestamp at or after `since_ms`), in order."""
    k = cfg.kafka
    deserialize = McpDeserializer(KafkaConnection(k).schema_registry(), k.topics.mcp)
    out = []
    for msg in read_to_end(k.resolved_bootstrap(), k.topics.mcp):
        if msg.timestamp()[1] < since_ms:
            continue
        mcp = deserialize(msg.value())
        assert msg.key().decode() == mcp.entityUrn
        system = json.dumps(mcp.systemMetadata.to_obj() if mcp.systemMetadata else None, sort_keys=True)
        out.append((mcp.entityUrn, str(mcp.aspectName), mcp.aspect.value.decode(), system))
    return out


def final_state(records: list[Record]) -> dict[tuple[str, str], str]:
    """Last value per (entityUrn, aspectName): what DataHub holds after ingesting the topic. (The
    system metadata of a URN that events of several partitions write, such as a user, depends on
    the order the partitions were interleaved in: it is compared in the records instead.)"""
    return {(urn, aspect): value for urn, aspect, value, _ in records}


def with_mcp_topic(path: Path, topic: str) -> tuple[Path, ConnectorConfig]:
    """The same connector (change and state topics, group, transactional ids) writing to another
    MCP topic."""
    data = yaml.safe_load(path.read_text())
    data["kafka"]["topics"]["mcp"] = topic
    out = path.with_name(f"{topic}.yml")
    out.write_text(yaml.safe_dump(data))
    return out, parse(data)


def removed(state: dict[tuple[str, str], str], urn: str) -> bool | None:
    status = state.get((urn, "status"))
    return None if status is None else json.loads(status)["removed"]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def mlflow(own_mlflow: MlflowServer) -> MlflowClient:
    populate(own_mlflow.uri)
    return MlflowClient(tracking_uri=own_mlflow.uri, registry_uri=own_mlflow.uri)


# -- replay from the beginning --------------------------------------------------------------------


def test_replay_from_beginning_reproduces_the_original(own_mlflow: MlflowServer, mlflow: MlflowClient,
                                                       make_config: ConfigFactory) -> None:
    experiment = mlflow.create_experiment("replay one")
    first = mlflow.create_run(experiment, run_name="first").info.run_id
    mlflow.set_terminated(first)
    mlflow.create_registered_model("replay model one")
    for _ in range(2):
        mlflow.create_model_version("replay model one", source=f"runs:/{first}/model", run_id=first)
    path_a, cfg_a = make_config(own_mlflow.uri)
    ok(run_cli("snapshot", "-c", str(path_a)))

    # Between the snapshots: a version is deleted (a DELETE event, a soft delete) and a run is
    # created (an entity the first snapshot did not know).
    mlflow.delete_model_version("replay model one", "2")
    second = mlflow.create_run(experiment, run_name="second").info.run_id
    ok(run_cli("snapshot", "-c", str(path_a)))
    original = mcp_records(cfg_a)
    state_a = final_state(original)
    gone = model_urn("replay model one", "2", SETTINGS)
    assert removed(state_a, gone) is True
    assert removed(state_a, model_urn("replay model one", "1", SETTINGS)) is False
    assert removed(state_a, experiment_urn("retired experiment")) is True

    path_b, cfg_b = with_mcp_topic(path_a, f"{cfg_a.kafka.topics.mcp}-b")
    result = ok(run_cli("replay", "-c", str(path_b), "--from-beginning"))
    assert f"replay of {cfg_a.kafka.topics.changes} from the beginning" in result.stdout
    assert "seconds:" in result.stdout
    assert "replay" not in "".join(line for line in result.stderr.splitlines() if "WARNING" in line)
    replayed = mcp_records(cfg_b)
    state_b = final_state(replayed)
    assert len(replayed) == len(original), result.stdout + result.stderr[-5000:]
    assert state_b == state_a
    # Not only the same end state: the same MCPs, so DataHub saw no spurious soft delete (of the
    # run created after the first snapshot, say) on the way.
    assert Counter(replayed) == Counter(original)
    assert removed(state_b, run_urn(second)) is False
    assert f"MCPs acknowledged on {cfg_b.kafka.topics.mcp}: {len(original)} " in result.stdout

    # The state topic and the group are where the original run left them: nothing left to write.
    again = ok(run_cli("snapshot", "-c", str(path_b)))
    assert f"MCPs acknowledged on {cfg_b.kafka.topics.mcp}: 0 " in again.stdout
    assert len(mcp_records(cfg_b)) == len(replayed)


# -- replay from a timestamp ----------------------------------------------------------------------


def test_replay_from_timestamp_rewrites_what_changed_after_it(own_mlflow: MlflowServer, mlflow: MlflowClient,
                                                              make_config: ConfigFactory) -> None:
    experiment = mlflow.create_experiment("replay two")
    trained = mlflow.create_run(experiment, run_name="trained").info.run_id
    mlflow.log_metric(trained, "accuracy", 0.9)
    mlflow.set_terminated(trained)
    model = "replay model two"
    mlflow.create_registered_model(model)
    mlflow.create_model_version(model, source=f"runs:/{trained}/model", run_id=trained)
    for _ in range(2):
        mlflow.create_model_version(model, source="s3://bucket/model")
    path_c, cfg_c = make_config(own_mlflow.uri)
    ok(run_cli("snapshot", "-c", str(path_c)))
    time.sleep(0.2)
    since = int(time.time() * 1000)
    time.sleep(0.2)

    # After T: a metric of a run (so also its model version 1), a tag of version 3, and version 2,
    # created before T, deleted (its soft delete needs the ownership known before T).
    mlflow.log_metric(trained, "accuracy", 0.95)
    mlflow.set_model_version_tag(model, "3", "reviewed", "yes")
    mlflow.delete_model_version(model, "2")
    ok(run_cli("snapshot", "-c", str(path_c)))
    after = mcp_records(cfg_c, since_ms=since)
    changed = {urn for urn, *_ in after}
    gone = model_urn(model, "2", SETTINGS)
    assert {run_urn(trained), model_urn(model, "1", SETTINGS), model_urn(model, "3", SETTINGS), gone} <= changed
    assert not changed & {experiment_urn("replay two"), experiment_urn("empty experiment"),
                          model_urn("demo classifier", "2", SETTINGS)}

    path_d, cfg_d = with_mcp_topic(path_c, f"{cfg_c.kafka.topics.mcp}-d")
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since // 1000)) + f".{since % 1000:03d}Z"
    result = ok(run_cli("replay", "-c", str(path_d), "--from-timestamp", iso))
    assert f"from {iso}" in result.stdout
    replayed = mcp_records(cfg_d)
    state_d = final_state(replayed)
    assert len(replayed) == len(after), result.stdout + result.stderr[-5000:]
    assert {urn for urn, *_ in replayed} == changed, "exactly the entities changed after T"
    assert state_d == final_state(after)
    assert Counter(replayed) == Counter(after)
    assert removed(state_d, gone) is True
    assert (experiment_urn("empty experiment"), "containerProperties") not in state_d


def test_replay_from_timestamp_never_skips_unconsumed_events(own_mlflow: MlflowServer, mlflow: MlflowClient,
                                                              make_config: ConfigFactory) -> None:
    """Events published before T that the group never consumed are replayed too: rewinding past
    them would leave them out of DataHub for good."""
    path, cfg = make_config(own_mlflow.uri)
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    published = producer.snapshot()
    producer.close()
    assert published.complete
    time.sleep(0.2)
    result = ok(run_cli("replay", "-c", str(path), "--from-timestamp", str(int(time.time() * 1000))))
    assert "has consumed only up to offset" in result.stderr
    markers = 2 * cfg.kafka.partitions  # SNAPSHOT_BEGIN and SNAPSHOT_END on every partition
    assert f"events reprocessed: {published.events + markers}\n" in result.stdout
    assert mcp_records(cfg)


# -- refusals -------------------------------------------------------------------------------------


def test_replay_refuses_while_a_consumer_of_the_group_runs(own_mlflow: MlflowServer, kafka: Kafka,
                                                           make_config: ConfigFactory, tmp_path: Path) -> None:
    path, cfg = make_config(own_mlflow.uri)
    log = open(tmp_path / "consume.log", "w")
    consumer = subprocess.Popen([sys.executable, "-m", "connector.cli", "consume", "-c", str(path)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        client = admin(cfg)
        deadline = time.monotonic() + 90
        while active_members(client, cfg.kafka.consumer_group) < 1:
            assert consumer.poll() is None, (tmp_path / "consume.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the consumer never joined its group"
            time.sleep(0.5)
        result = run_cli("replay", "-c", str(path), "--from-beginning")
        assert result.returncode == 1
        assert f"stop the consumers of group {cfg.kafka.consumer_group} first (1 member active)" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(60)
        log.close()


@pytest.mark.parametrize("value", ["yesterday", "1795793706"])
def test_bad_timestamp_argument(make_config: ConfigFactory, value: str) -> None:
    path, _ = make_config(UNUSED_MLFLOW)
    result = run_cli("replay", "-c", str(path), "--from-timestamp", value)
    assert result.returncode == 1
    assert "--from-timestamp" in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr


def test_change_topic_settings_that_break_replay_are_named(own_mlflow: MlflowServer, kafka: Kafka,
                                                          make_config: ConfigFactory) -> None:
    path, cfg = make_config(own_mlflow.uri)
    topic = cfg.kafka.topics.changes
    client = admin(cfg)
    futures = client.create_topics([NewTopic(topic, 3, 1, config={"cleanup.policy": "delete",
                                                                      "retention.ms": "86400000"})])
    futures[topic].result(30)
    result = ok(run_cli("replay", "-c", str(path), "--from-beginning"))
    assert f"topic {topic}: cleanup.policy=delete breaks replay" in result.stderr
    assert "retention.ms=86400000" in result.stderr
    assert "events reprocessed: 0" in result.stdout


# -- pure parts -----------------------------------------------------------------------------------


def test_timestamps() -> None:
    now = 1_900_000_000_000
    assert parse_timestamp("2026-11-27T10:00:00Z", now) == 1_795_773_600_000
    assert parse_timestamp("2026-11-27T11:00:00+01:00", now) == 1_795_773_600_000
    assert parse_timestamp("2026-11-27T10:00:00", now) == 1_795_773_600_000  # no zone: UTC
    assert parse_timestamp("1795773600000", now) == 1_795_773_600_000
    for bad, why in (("1795773600", "epoch seconds"), ("2031-01-01T00:00:00Z", "in the future"),
                     ("10:00 yesterday", "not an ISO-8601 time")):
        with pytest.raises(ReplayError, match=why) as error:
            parse_timestamp(bad, now)
        assert str(error.value).startswith("--from-timestamp")


def test_created_topics_have_no_replay_hazard(make_config: ConfigFactory) -> None:
    _, cfg = make_config(UNUSED_MLFLOW)
    roles = {cfg.kafka.topics.changes: "changes", cfg.kafka.topics.state: "state",
             cfg.kafka.topics.producer_offsets: "producer_offsets"}
    for spec in specs(cfg):
        if spec.name in roles:
            assert hazards(roles[spec.name], spec.name, spec.config) == []
    changes = cfg.kafka.topics.changes
    assert hazards("changes", changes, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"})[0].startswith(
        f"topic {changes}: min.compaction.lag.ms=0 limits replay --from-timestamp")
    assert "retention.ms=3600000" in hazards("changes", changes, {"cleanup.policy": "compact,delete",
                                                                  "min.compaction.lag.ms": str(WEEK_MS),
                                                                  "retention.ms": "3600000"})[0]
    assert hazards("changes", changes, {"cleanup.policy": "compact,delete", "retention.ms": "-1",
                                        "min.compaction.lag.ms": str(WEEK_MS)}) == []
    assert "loses what the consumer wrote" in hazards("state", "s", {"cleanup.policy": "delete"})[0]
