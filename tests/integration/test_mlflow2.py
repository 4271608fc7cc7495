"""MLflow 2.x servers: a real MLflow 2.20 server in its own virtualenv, started as 2.x starts by default
(gunicorn), with content written by MLflow 2.x's own client.

The MLflow 3 client adds a prompt filter to every registry search that a 2.x server answers with
nothing; the connector reads the registry without it. Here: the registry is read in full (what
MLflow 2.x's own client lists), in snapshots, incremental cycles and targeted (webhook) reads, and
the parity test with DataHub's MLflowSource holds on 2.x as on 3.x.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.devstack.mlflow_server import MlflowServer, mlflow2_python, run_with
from connector.kafka.topics import ensure_topics
from connector.mlflow.incremental import read_model
from connector.mlflow.reader import MlflowReader, ReaderSettings, reader_settings
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, mlflow2_server
from tests.integration.test_incremental import Topic
from tests.integration.test_parity import EXPECTED_DIFFERENCES, _assert_parity, _check_demo_values, parity


@pytest.fixture(scope="module")
def mlflow2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow 2.x server holding the demo content, written by MLflow 2.x's client."""
    with mlflow2_server(tmp_path_factory, "mlflow2") as (server, python):
        run_with(python, "connector.devstack.demo.populate", server.uri)
        yield server


def _descendants(pid: int) -> list[str]:
    """Command lines of every process below `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    out = []
    for child in found:
        try:
            out.append((Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


def test_the_server_is_mlflow_2_served_by_gunicorn(mlflow2: MlflowServer) -> None:
    assert mlflow2.version.startswith("2."), mlflow2.version
    assert mlflow2.process is not None
    tree = _descendants(mlflow2.process.pid)
    assert any("gunicorn" in c for c in tree), tree


def _ours(uri: str) -> dict[str, list[str]]:
    reader = MlflowReader(ReaderSettings(uri, uri))
    listing: dict[str, list[str]] = {m.name: [] for page in reader.registered_models() for m in page}
    for page in reader.model_versions():
        for version in page:
            listing.setdefault(version.name, []).append(str(version.version))
    return {name: sorted(versions, key=int) for name, versions in sorted(listing.items())}


def test_the_registry_is_read_as_mlflow_2s_own_client_lists_it(mlflow2: MlflowServer) -> None:
    theirs = json.loads(run_with(mlflow2_python(), "connector.devstack.demo.registry_listing", mlflow2.uri))
    assert len(theirs) >= 2 and sum(len(v) for v in theirs.values()) >= 5, theirs  # the demo's registry
    assert _ours(mlflow2.uri) == theirs


def test_parity_with_datahub_mlflow_source_on_mlflow_2(mlflow2: MlflowServer, make_config: ConfigFactory,
                                                       tmp_path: Path) -> None:
    comparison, ours, facts = parity(mlflow2, make_config, tmp_path, {})
    _assert_parity(comparison, EXPECTED_DIFFERENCES)
    _check_demo_values(ours, facts)
    groups = {urn for urn, kind in ours.entity_types.items() if kind == "mlModelGroup"}
    assert len(groups) >= 2, groups


def test_cycles_and_targeted_reads_see_registry_changes_on_mlflow_2(mlflow2: MlflowServer, make_config: ConfigFactory,
                                                                    kafka: Kafka) -> None:
    _, cfg = make_config(mlflow2.uri, {"producer": {"watermark_overlap_seconds": 1}})
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    topic = Topic(kafka, cfg)
    try:
        summary = producer.snapshot()
        assert summary.complete, summary.reason
        assert summary.entities.get("REGISTERED_MODEL", 0) >= 2, summary.entities
        read = topic.new()
        assert any(key.startswith("registered_model:") for _, key in read)
        time.sleep(1.2)
        producer.cycle()
        topic.new()

        run_id = run_with(mlflow2_python(), "connector.devstack.demo.live_change", mlflow2.uri).strip().splitlines()[-1]
        time.sleep(1.2)  # past the watermark overlap
        producer.cycle()
        published = topic.new()
        assert ("UPDATE", f"run:{run_id}") in published or ("CREATE", f"run:{run_id}") in published, published
        new_versions = [key for op, key in published if op == "CREATE" and key.startswith("model_version:")]
        assert len(new_versions) == 1 and "demo classifier" in new_versions[0], published

        # A targeted read, as a webhook triggers (2.x has no webhooks: the cycle above is what sees it).
        changes = read_model(producer.reader, producer.known, producer.experiment_names, "demo classifier")
        kinds = {kind for kind, _ in changes.entities}
        assert {"REGISTERED_MODEL", "MODEL_VERSION"} <= kinds, kinds
    finally:
        producer.close()
