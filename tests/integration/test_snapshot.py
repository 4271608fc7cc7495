"""Integration: the demo MLflow goes through `mlflow-datahub snapshot` on the real stack; the MCP topic
is read back with DataHub's own MCP Avro schema and checked entity by entity."""

from __future__ import annotations

import io
import json
import struct
from collections import Counter
from pathlib import Path

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from datahub.metadata.schema_classes import ASPECT_CLASSES
from datahub.metadata.schemas import getMetadataChangeProposalSchema

from connector.datahub.mapping import (
    MappingSettings,
    experiment_urn,
    model_group_urn,
    model_urn,
    run_urn,
    stage_tag_urn,
)
from connector.devstack.mlflow_server import MlflowServer
from tests.conftest import ConfigFactory, Kafka, read_to_end, run_cli

ASPECTS = {cls.ASPECT_NAME: cls for cls in ASPECT_CLASSES}


def _read_topic(kafka: Kafka, topic: str) -> list[tuple[str, bytes]]:
    return [(m.key().decode(), m.value()) for m in read_to_end(kafka.bootstrap, topic)]


def test_snapshot_of_demo_mlflow(demo_mlflow: MlflowServer, kafka: Kafka, make_config: ConfigFactory,
                                 tmp_path: Path) -> None:
    path, cfg = make_config(demo_mlflow.uri)
    result = run_cli("snapshot", "-c", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "complete" in result.stdout
    assert "entities: 16 (4 experiment, 2 registered_model, 5 run, 5 model_version)" in result.stdout

    records = _read_topic(kafka, cfg.kafka.topics.mcp)
    assert records, "nothing on the MCP topic"

    # Confluent wire format with DataHub's MCP schema, registered under <topic>-value.
    registry = SchemaRegistryClient({"url": kafka.registry})
    registered = registry.get_latest_version(f"{cfg.kafka.topics.mcp}-value")
    schema = fastavro.parse_schema(json.loads(getMetadataChangeProposalSchema()))
    decoded: dict[tuple[str, str], dict] = {}
    for key, value in records:
        magic, schema_id = struct.unpack(">bI", value[:5])
        assert magic == 0
        assert schema_id == registered.schema_id
        mcp = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, schema)
        assert key == mcp["entityUrn"], "record key must be the entity URN"
        assert mcp["changeType"] == "UPSERT"
        assert mcp["aspect"]["contentType"] == "application/json"
        aspect_json = json.loads(mcp["aspect"]["value"])
        aspect = ASPECTS[mcp["aspectName"]].from_obj(aspect_json)
        assert aspect.validate(), f"{mcp['aspectName']} of {key} does not validate"
        decoded[(key, mcp["aspectName"])] = aspect_json

    settings = MappingSettings()
    # Experiments: the default, the training one (name with a slash and a space), the empty one and
    # the deleted one (status removed).
    for name, removed in (("Default", False), ("demo/training runs", False), ("empty experiment", False),
                          ("retired experiment", True)):
        urn = experiment_urn(name)
        assert decoded[(urn, "containerProperties")]["name"] == name
        assert decoded[(urn, "subTypes")] == {"typeNames": ["ML Experiment"]}
        assert decoded[(urn, "status")] == {"removed": removed}
    training = decoded[(experiment_urn("demo/training runs"), "containerProperties")]
    assert training["description"] == "Training runs for the demo"
    assert training["customProperties"]["team"] == "search"

    # Runs: finished, failed and running, with params, metrics, tags, dataset input.
    from mlflow import MlflowClient

    client = MlflowClient(demo_mlflow.uri)
    runs = {r.info.run_name: r for r in client.search_runs(["0", "1"])}
    finished = run_urn(runs["finished run"].info.run_id)
    assert decoded[(finished, "mlTrainingRunProperties")]["hyperParams"] == [
        {"name": "learning_rate", "value": "0.01"}, {"name": "epochs", "value": "10"}]
    assert {m["name"]: m["value"] for m in decoded[(finished, "mlTrainingRunProperties")]["trainingMetrics"]} == {
        "accuracy": "0.93", "loss": "0.21"}
    assert decoded[(finished, "dataProcessInstanceProperties")]["customProperties"]["owner"] == "alice"
    assert decoded[(finished, "dataProcessInstanceRunEvent")]["result"]["type"] == "SUCCESS"
    assert decoded[(finished, "container")]["container"] == experiment_urn("demo/training runs")
    inputs = decoded[(finished, "dataProcessInstanceInput")]["inputEdges"]
    dataset = "urn:li:dataset:(urn:li:dataPlatform:mlflow,iris training set,PROD)"
    assert [e["destinationUrn"] for e in inputs] == [dataset]
    assert [f["fieldPath"] for f in decoded[(dataset, "schemaMetadata")]["fields"]] == ["sepal length", "label"]
    outputs = {e["destinationUrn"] for e in decoded[(finished, "dataProcessInstanceOutput")]["outputEdges"]}
    assert outputs == {model_urn("demo classifier", "1", settings), model_urn("demo classifier", "4", settings)}
    failed = run_urn(runs["failed run"].info.run_id)
    assert decoded[(failed, "dataProcessInstanceRunEvent")]["result"]["type"] == "FAILURE"
    running = run_urn(runs["running run"].info.run_id)
    assert decoded[(running, "dataProcessInstanceRunEvent")]["status"] == "STARTED"

    # Registry: versions in every stage, an alias, a version without a run, a model without versions.
    stages = {"1": "production", "2": "staging", "3": "archived", "4": "none", "5": "none"}
    for version, stage in stages.items():
        urn = model_urn("demo classifier", version, settings)
        assert decoded[(urn, "globalTags")] == {"tags": [{"tag": stage_tag_urn(stage)}]}
        assert decoded[(urn, "mlModelProperties")]["groups"] == [model_group_urn("demo classifier", settings)]
    v1 = model_urn("demo classifier", "1", settings)
    assert decoded[(v1, "versionProperties")]["aliases"] == [{"versionTag": "champion"}]
    assert decoded[(v1, "mlModelProperties")]["trainingJobs"] == [finished]
    v5 = decoded[(model_urn("demo classifier", "5", settings), "mlModelProperties")]
    assert v5["trainingJobs"] == [] and "hyperParams" not in v5
    lonely = decoded[(model_group_urn("model without versions", settings), "mlModelGroupProperties")]
    assert lonely["description"] == "nothing registered yet"
    for stage in ("production", "staging", "archived", "none"):
        assert decoded[(stage_tag_urn(stage), "tagProperties")]["name"] == f"mlflow_{stage}"


def test_second_snapshot_writes_no_unchanged_aspect(demo_mlflow: MlflowServer, kafka: Kafka,
                                                    make_config: ConfigFactory) -> None:
    path, cfg = make_config(demo_mlflow.uri)
    assert run_cli("snapshot", "-c", str(path)).returncode == 0
    first = len(_read_topic(kafka, cfg.kafka.topics.mcp))
    again = run_cli("snapshot", "-c", str(path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "MCPs acknowledged on" in again.stdout and ": 0 (unchanged aspects skipped:" in again.stdout
    assert len(_read_topic(kafka, cfg.kafka.topics.mcp)) == first


def _mcp_contents(kafka: Kafka, topic: str) -> Counter[tuple[str, str, bytes]]:
    """(URN, aspect, the aspect's JSON) -> how many times it was written. A shared URN (a stage tag,
    a user) is written once by each partition's events that carry it."""
    schema = fastavro.parse_schema(json.loads(getMetadataChangeProposalSchema()))
    out: Counter[tuple[str, str, bytes]] = Counter()
    for key, value in _read_topic(kafka, topic):
        mcp = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, schema)
        out[(key, mcp["aspectName"], mcp["aspect"]["value"])] += 1
    return out


def test_snapshot_with_two_consumer_processes_writes_what_one_writes(
        demo_mlflow: MlflowServer, kafka: Kafka, make_config: ConfigFactory) -> None:
    one_path, one = make_config(demo_mlflow.uri, name="one.yml")
    two_path, two = make_config(demo_mlflow.uri, name="two.yml")
    first = run_cli("snapshot", "-c", str(one_path))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("snapshot", "-c", str(two_path), "--consumers", "2", "--instance-id", "pair")
    assert second.returncode == 0, second.stderr[-3000:]
    # Both consumers took part, each under its own name (its own transactional id).
    assert "consumer pair-1 reading" in second.stderr and "consumer pair-2 reading" in second.stderr
    expected = _mcp_contents(kafka, one.kafka.topics.mcp)
    assert len(expected) > 50
    assert _mcp_contents(kafka, two.kafka.topics.mcp) == expected
    assert f"MCPs acknowledged on {two.kafka.topics.mcp}: {sum(expected.values())} " in second.stdout


def test_snapshot_fails_in_one_line_when_its_consumer_process_dies(
        demo_mlflow: MlflowServer, make_config: ConfigFactory) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    path, _ = make_config(demo_mlflow.uri, {"producer": {"max_requests_per_second": 1}})  # a slow snapshot
    command = subprocess.Popen([sys.executable, "-m", "connector.cli", "snapshot", "-c", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.2)
            with open(f"/proc/{command.pid}/task/{command.pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        assert children, "no consumer process was started"
        time.sleep(2)  # let it join the group and start
        os.kill(children[0], signal.SIGKILL)
        out, err = command.communicate(timeout=120)
    finally:
        command.kill()
    assert command.returncode == 1
    assert "mlflow-datahub: consumer: consumer process 1 exited with code -9" in err, err[-2000:]
    assert "Traceback" not in err
