"""Beyond the original: a model version's features (its logged model's signature) and its training data,
on real MLflow servers (3.x: LoggedModels, `models:/m-...` sources; 2.x: `runs:/.../model` sources),
through the real broker and registry: `mlflow-datahub snapshot`, `dump`, and DataHub's own
`datahub check metadata-file` on the dump. Signatures are read once per version ever: an unchanged
cycle, and a snapshot after a restart, make no artifact request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from connector.config import ConnectorConfig
from connector.datahub.mapping import MappingSettings, feature_urn, model_urn, run_urn
from connector.devstack.mlflow_server import MlflowServer, free_port, run_with
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, ReaderSettings, reader_settings
from connector.pipeline import producer as producer_module
from connector.pipeline.producer import ChangeProducer
from connector.pipeline.status import read_status
from tests.conftest import ConfigFactory, mlflow2_server, run_cli
from tests.integration.test_crash import Process
from tests.signature_content import BARE_MODEL, IRIS, MODEL

SETTINGS = MappingSettings()
ARTIFACT_CALL = "model version artifact"


def _populate(python: str | Path, uri: str) -> dict[str, Any]:
    return json.loads(run_with(python, "tests.signature_content.populate", uri).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mlflow3(own_mlflow: MlflowServer) -> tuple[MlflowServer, dict[str, Any]]:
    return own_mlflow, _populate(sys.executable, own_mlflow.uri)


@pytest.fixture(scope="module")
def mlflow2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, dict[str, Any]]]:
    with mlflow2_server(tmp_path_factory, "mlflow2-signatures") as (server, python):
        yield server, _populate(python, server.uri)


def _snapshot_and_dump(config: Path, out: Path) -> tuple[list[dict[str, Any]], str]:
    result = run_cli("snapshot", "-c", str(config))
    assert result.returncode == 0, f"snapshot failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    dumped = run_cli("dump", "-c", str(config), "--out", str(out))
    assert dumped.returncode == 0, f"dump failed:\n{dumped.stdout[-3000:]}\n{dumped.stderr[-3000:]}"
    # DataHub's own check of a metadata file: every MCP of the dump, the features' included
    datahub = Path(sys.executable).parent / "datahub"
    check = subprocess.run([str(datahub), "check", "metadata-file", str(out)], capture_output=True, text=True,
                           timeout=300, env={"DATAHUB_TELEMETRY_ENABLED": "false", "PATH": str(datahub.parent)})
    assert check.returncode == 0, f"datahub check metadata-file refused the dump:\n{check.stdout[-3000:]}\n" \
                                  f"{check.stderr[-3000:]}"
    return json.loads(out.read_text()), result.stdout + result.stderr


def _latest(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(URN, aspect) -> the last value on the MCP topic (DataHub upserts)."""
    return {(r["entityUrn"], r["aspectName"]): r["aspect"]["json"] for r in records}


def _check_features(records: list[dict[str, Any]], runs: dict[str, str]) -> None:
    found = _latest(records)
    v1, v2 = model_urn(MODEL, "1", SETTINGS), model_urn(MODEL, "2", SETTINGS)
    v1_features = [feature_urn(MODEL, c, SETTINGS) for c in IRIS]
    v2_features = [feature_urn(MODEL, c, SETTINGS) for c in [*IRIS[:3], "colour, name", "count"]]
    # the versions list exactly their signature's inputs, in the signature's order
    assert found[(v1, "mlModelProperties")]["mlFeatures"] == v1_features
    assert found[(v2, "mlModelProperties")]["mlFeatures"] == v2_features
    outputs = json.loads(found[(v1, "mlModelProperties")]["customProperties"]["mlflow.signature.outputs"])
    assert outputs == [{"name": "species", "type": "long", "kind": "column", "optional": False}], outputs
    # one mlFeature per input of any live version, with its type
    features = {r["entityUrn"] for r in records if r["entityType"] == "mlFeature"}
    assert features == set(v1_features) | set(v2_features)
    types = {urn: found[(urn, "mlFeatureProperties")]["dataType"] for urn in features}
    assert types[feature_urn(MODEL, IRIS[0], SETTINGS)] == "CONTINUOUS"
    assert types[feature_urn(MODEL, "colour, name", SETTINGS)] == "TEXT"
    assert types[feature_urn(MODEL, "count", SETTINGS)] == "COUNT"
    assert found[(feature_urn(MODEL, "count", SETTINGS), "mlFeatureProperties")]["customProperties"][
        "mlflow.type"] == "long"
    assert all(found[(urn, "status")] == {"removed": False} for urn in features)
    # training data: the datasets of the run's dataProcessInstanceInput, and the run as training job
    for version, urn in (("1", v1), ("2", v2)):
        run = run_urn(runs[version])
        inputs = [e["destinationUrn"] for e in found[(run, "dataProcessInstanceInput")]["inputEdges"]]
        assert len(inputs) == 1 and f"iris frame {version}" in inputs[0], inputs
        assert [d["dataset"] for d in found[(urn, "mlModelTrainingData")]["trainingData"]] == inputs
        assert found[(urn, "mlModelProperties")]["trainingJobs"] == [run]
    # a version whose source has no artifacts: everything as before, no features
    bare = found[(model_urn(BARE_MODEL, "1", SETTINGS), "mlModelProperties")]
    assert "mlFeatures" not in bare and bare["trainingJobs"], bare
    assert found[(model_urn(BARE_MODEL, "1", SETTINGS), "mlModelTrainingData")] == {"trainingData": []}


def test_features_and_training_data_on_mlflow_3(mlflow3: tuple[MlflowServer, dict[str, Any]],
                                                make_config: ConfigFactory, tmp_path: Path) -> None:
    server, content = mlflow3
    assert content["mlflow"].startswith("3."), content
    sources = {v.version: v.source for v in MlflowClient(server.uri, server.uri).search_model_versions(
        f"name = '{MODEL}'")}
    assert all(s.startswith("models:/m-") for s in sources.values()), sources  # LoggedModels
    config, cfg = make_config(server.uri)
    records, output = _snapshot_and_dump(config, tmp_path / "dump.json")
    _check_features(records, content["runs"])
    assert f"model {BARE_MODEL!r} version 1: no features (signature unreadable" in output, output[-3000:]
    # the snapshot read none; the features pass after it read the three, once each
    assert "features: signatures of 3 of 3 model versions read after it" in output, output[-3000:]

    # Reading signatures again: not in an unchanged cycle, not after a restart
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    try:
        assert len(producer.known.signatures) == 3  # restored from the producer-offsets topic
        producer.cycle()
        summary = producer.snapshot()
        assert summary.complete, summary.reason
        producer.cycle()
        assert producer.reader.requests_by_call[ARTIFACT_CALL] == 0, producer.reader.requests_by_call
        assert summary.signatures_unread == 0 and producer.features is None
    finally:
        producer.close()

    # Version 2 is deleted: its features that no live version lists are soft-deleted, the others stay
    MlflowClient(server.uri, server.uri).delete_model_version(MODEL, "2")
    records, _ = _snapshot_and_dump(config, tmp_path / "after-delete.json")
    found = _latest(records)
    for column in ("colour, name", "count"):
        assert found[(feature_urn(MODEL, column, SETTINGS), "status")] == {"removed": True}, column
    for column in IRIS:
        assert found[(feature_urn(MODEL, column, SETTINGS), "status")] == {"removed": False}, column
    assert found[(model_urn(MODEL, "2", SETTINGS), "status")] == {"removed": True}


def test_features_and_training_data_on_mlflow_2(mlflow2: tuple[MlflowServer, dict[str, Any]],
                                                make_config: ConfigFactory, tmp_path: Path) -> None:
    server, content = mlflow2
    assert content["mlflow"].startswith("2."), content
    config, cfg = make_config(server.uri)
    _check_sources_are_runs_uris(cfg, content)
    records, output = _snapshot_and_dump(config, tmp_path / "dump.json")
    _check_features(records, content["runs"])
    assert f"model {BARE_MODEL!r} version 1: no features (signature unreadable" in output, output[-3000:]


def _check_sources_are_runs_uris(cfg: ConnectorConfig, content: dict[str, Any]) -> None:
    ensure_topics(cfg)
    reader = MlflowReader(reader_settings(cfg))
    sources = {v.version: v.source for page in reader.model_versions_of([MODEL]) for v in page}
    assert sources == {n: f"runs:/{run_id}/model" for n, run_id in content["runs"].items()}, sources


def test_a_snapshot_reads_no_artifact_and_run_reads_the_features_after_it(
        mlflow2: tuple[MlflowServer, dict[str, Any]], make_config: ConfigFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first snapshot is not held up by an artifact request per version: it publishes the versions without
    their signatures and ends. Its process ends too (a crash, or a holder of the role gone): the next `run`
    finds the versions unread in the producer-offsets topic and reads them, between its cycles."""
    server, content = mlflow2
    config, cfg = make_config(server.uri, {"producer": {"reconcile_interval_seconds": 3600}})
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    try:
        summary = producer.snapshot()
        assert summary.complete, summary.reason
        assert producer.reader.requests_by_call[ARTIFACT_CALL] == 0, producer.reader.requests_by_call
        assert summary.signatures_unread == 3 and producer.features is not None
        assert producer.features.due == {MODEL: ["1", "2"], BARE_MODEL: ["1"]}, producer.features.due
    finally:
        producer.close()  # gone before its features pass: what it did not read is in Kafka, not in its memory
    assert read_status(cfg).signatures_unread == 3

    # An outage during the pass: a step fails, nothing is lost, and it is tried again after a backoff (`run`);
    # the `snapshot` command's pass ends with the reason instead.
    monkeypatch.setattr(producer_module, "CYCLE_RETRY_SECONDS", 0.5)
    dead = f"http://127.0.0.1:{free_port()}"
    outage = ChangeProducer(cfg, MlflowReader(ReaderSettings(dead, dead, retry_for_seconds=0)))
    try:
        assert outage.features is not None and outage.features.after == "start-up"
        assert outage.features.remaining == 3
        outage._features_step_or_backoff()
        assert outage.features.failures == 1 and outage.features.next_at > time.monotonic()
        assert outage.features.remaining == 3 and outage.known.signatures == {}
        ended = outage.read_features()
        assert ended is not None and ended.reason and ended.read == 0 and outage.features is None
    finally:
        outage.close()

    run = Process(["run", "-c", str(config), "--instance-id", "features-run"], tmp_path / "run.log")
    run.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert run.alive(), (tmp_path / "run.log").read_text()[-3000:]
            dumped = run_cli("dump", "-c", str(config), "--out", str(tmp_path / "dump.json"))
            assert dumped.returncode == 0, dumped.stderr[-3000:]
            records = json.loads((tmp_path / "dump.json").read_text())
            try:
                _check_features(records, content["runs"])
                break
            except (AssertionError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        assert run.stop() == 0
    log = (tmp_path / "run.log").read_text()
    assert "features: reading the signatures of 3 model versions of 2 registered models, never read (found by " \
           "start-up)" in log, log[-3000:]
    assert "features: 3 model versions read" in log and "without features: 1 unreadable" in log, log[-3000:]
    # read once: a restart finds nothing left to read
    status = read_status(cfg)
    assert status.signatures_unread == 0 and "signature is still to be read: 0" in "\n".join(status.lines())
    again = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    try:
        assert again.features is None and len(again.known.signatures) == 3
    finally:
        again.close()
