"""Any name MLflow accepts goes through, on a real MLflow server and the real Kafka: experiments, runs,
dataset inputs, registered models and versions named with quotes of both kinds, backslashes (also
trailing), commas, parentheses, semicolons, percent signs, unicode, emoji and 250 characters are
snapshotted, followed through incremental cycles and targeted reads, and written to DataHub with URNs
that parse; nothing is skipped or falsely deleted, and a model whose URN is over DataHub's length limit
goes to the dead-letter topic with a warning naming it. On a real MLflow 2.x (gunicorn): name lists,
which 2.x refuses, are asked one name at a time, and long lists of run ids stay within gunicorn's
request line."""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

import pytest
from datahub.metadata.urns import Urn
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from connector.contract import codec
from connector.contract.events import ChangeEvent, experiment_key, model_version_key, registered_model_key
from connector.datahub.mapping import MappingSettings, experiment_urn, model_group_urn, model_urn, run_urn
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.topics import ensure_topics
from connector.mlflow.incremental import read_model
from connector.mlflow.reader import MlflowReader, ReaderSettings, reader_settings
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, mlflow2_server, read_to_end
from tests.hostile_names import END_TO_END, urns_in
from tests.integration.test_deletions import consume_until, mcps

SETTINGS = MappingSettings()
NAMES = END_TO_END
DELETED_VERSION = "O'Brien"  # its version 1 is deleted in MLflow: the one DELETE there must be
OVER_LONG = "ü" * 100  # 100 characters, 600 bytes URL-encoded: its URNs are over DataHub's limit (512)


class Changes:
    """The change topic; `new()` returns the events committed since its last call."""

    def __init__(self, kafka: Kafka, topic: str) -> None:
        self.kafka, self.topic, self.seen = kafka, topic, set[tuple[int, int]]()

    def new(self) -> list[ChangeEvent]:
        fresh = [m for m in read_to_end(self.kafka.bootstrap, self.topic)
                 if (m.partition(), m.offset()) not in self.seen and m.value() is not None]
        self.seen |= {(m.partition(), m.offset()) for m in fresh}
        return [codec.decode(m.value()) for m in fresh]


def _populate(client: MlflowClient) -> tuple[dict[str, str], dict[str, str]]:
    """Per name: an experiment, a run in progress in it (tagged, with a dataset input of that name),
    and a registered model with version 1 from the run. Returns experiment ids and run ids by name."""
    experiments, runs = {}, {}
    for name in [*NAMES, OVER_LONG]:
        experiments[name] = client.create_experiment(name, tags={"label": name})
        run = client.create_run(experiments[name], run_name=name, tags={"label": name}).info.run_id
        client.log_param(run, "alpha", "0.5")
        dataset = Dataset(name=name, digest="d1g35t", source_type="local", source="file:///tmp/data.csv")
        client.log_inputs(run, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
        client.create_registered_model(name, tags={"label": name})
        client.create_model_version(name, f"runs:/{run}/model", run_id=run)
        runs[name] = run
    return experiments, runs


def test_hostile_names_are_read_followed_and_written(own_mlflow: MlflowServer, kafka: Kafka,
                                                     make_config: ConfigFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    experiments, runs = _populate(client)
    _, cfg = make_config(own_mlflow.uri, {"producer": {"watermark_overlap_seconds": 1}})
    ensure_topics(cfg)
    caplog.set_level(logging.INFO)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg, retry_for_seconds=30)))
    try:
        # 1. A snapshot: every object of every name, nothing deleted.
        summary = producer.snapshot()
        assert summary.complete, summary.reason
        assert summary.deletes == 0
        topic = Changes(kafka, cfg.kafka.topics.changes)
        keys = {e["key"] for e in topic.new()}
        expected = {key for name in NAMES for key in (experiment_key(experiments[name]), f"run:{runs[name]}",
                                                      registered_model_key(name), model_version_key(name, "1"))}
        assert expected - keys == set()

        # 2. An incremental cycle after a change to each: a tag on every experiment, a metric on every
        #    run in progress, a new version of every model (from the run in progress), a version deleted.
        time.sleep(1.2)  # past the watermark overlap
        for name in NAMES:
            client.set_experiment_tag(experiments[name], "changed", "yes")
            client.log_metric(runs[name], "loss", 0.25)
            client.create_model_version(name, f"runs:/{runs[name]}/model2", run_id=runs[name])
        client.delete_model_version(DELETED_VERSION, "1")
        producer.cycle()
        fresh = topic.new()
        published = {(e["op"], e["key"]) for e in fresh}
        assert {key for op, key in published if op == "DELETE"} == {model_version_key(DELETED_VERSION, "1")}
        for name in NAMES:
            assert {("UPDATE", experiment_key(experiments[name])), ("UPDATE", f"run:{runs[name]}"),
                    ("UPDATE", registered_model_key(name)), ("CREATE", model_version_key(name, "2"))} <= published, name
        run_events = [e for e in fresh if e["kind"] == "RUN"]
        assert all({m["key"] for m in e["after"]["metrics"]} == {"loss"} for e in run_events)

        # 3. Another cycle: every run ends (runs in progress are re-read by id).
        for name in NAMES:
            client.set_terminated(runs[name])
        producer.cycle()
        fresh = topic.new()
        assert not [e for e in fresh if e["op"] == "DELETE"]
        finished = {e["key"] for e in fresh if e["kind"] == "RUN" and e["after"]["status"] == "FINISHED"}
        assert finished >= {f"run:{runs[name]}" for name in NAMES}

        # 4. Targeted reads (as webhooks trigger them) of each model: all of it, nothing gone.
        for name in NAMES:
            changes = read_model(producer.reader, producer.known, producer.experiment_names, name)
            assert changes.deleted_keys == [], name
            read = {(kind, e["name"], e.get("version")) for kind, e in changes.entities
                    if kind in ("REGISTERED_MODEL", "MODEL_VERSION")}
            versions = ["2"] if name == DELETED_VERSION else ["1", "2"]
            assert read == {("REGISTERED_MODEL", name, None)} | {("MODEL_VERSION", name, v) for v in versions}, name
        producer.refresh_model(NAMES)
        assert not [e for e in topic.new() if e["op"] == "DELETE"]

        # 5. The reconciling snapshot deletes nothing more; the consumer writes it all.
        summary = producer.snapshot()
        assert summary.complete and summary.deletes == 0, summary
    finally:
        producer.close()
    consume_until(cfg, summary.end_offsets, "hostile-names")

    # Every URN written parses (and round-trips) with DataHub's own Urn class.
    records = mcps(kafka, cfg)
    for urn, _, value in records:
        for one in [urn, *urns_in(value)]:
            assert str(Urn.from_string(one)) == one, one
    statuses: dict[str, Any] = {urn: value for urn, aspect, value in records if aspect == "status"}
    gone = model_urn(DELETED_VERSION, "1", SETTINGS)
    assert statuses[gone] == {"removed": True}
    for name in NAMES:
        live = [experiment_urn(name), run_urn(runs[name]), model_group_urn(name, SETTINGS),
                model_urn(name, "2", SETTINGS)]
        if name != DELETED_VERSION:
            live.append(model_urn(name, "1", SETTINGS))
        for urn in live:
            assert statuses.get(urn) == {"removed": False}, (name, urn)
    assert [urn for urn, value in statuses.items() if value == {"removed": True}] == [gone]
    # The later writes arrived: version 2 of every model, the runs' metrics.
    properties = {urn: value for urn, aspect, value in records if aspect == "mlModelProperties"}
    training = {urn: value for urn, aspect, value in records if aspect == "mlTrainingRunProperties"}
    for name in NAMES:
        assert properties[model_urn(name, "2", SETTINGS)]["groups"] == [model_group_urn(name, SETTINGS)]
        assert training[run_urn(runs[name])]["trainingMetrics"] == [{"name": "loss", "value": "0.25"}]

    # The model (and the run's dataset input) whose URNs are too long for DataHub: dead-lettered with the
    # reason, never silently lost.
    dead = [(codec.decode(m.value())["key"], dict(m.headers() or [])) for m in
            read_to_end(kafka.bootstrap, cfg.kafka.topics.dead_letter)]
    assert {key for key, _ in dead} == {registered_model_key(OVER_LONG), model_version_key(OVER_LONG, "1"),
                                        f"run:{runs[OVER_LONG]}"}
    assert all(b"over DataHub's limit of 512" in headers["error"] for _, headers in dead)
    assert "change event not writable to DataHub" in caplog.text and f"registered model '{OVER_LONG[:60]}'" \
        in caplog.text
    assert not any(urn.startswith(f"urn:li:mlModel:(urn:li:dataPlatform:mlflow,{OVER_LONG}") for urn, _, _ in records)


# ---- MLflow 2.x -----------------------------------------------------------------------------------

POPULATE_2X = """
import sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1], sys.argv[1])
run = client.create_run(client.create_experiment("hostile")).info.run_id
for name in sys.argv[2:]:
    client.create_registered_model(name)
    client.create_model_version(name, "runs:/%s/model" % run, run_id=run)
print(run)
"""


def test_mlflow_2_takes_no_name_lists_and_gunicorn_no_long_request_lines(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with mlflow2_server(tmp_path_factory, "mlflow2-names") as (server, python):
        names = ["O'Brien", 'say "hi"', "both ' and \"", "trail\\", "a,b(c)", "plain", "plain 2"]
        run = subprocess.run([str(python), "-c", POPULATE_2X, server.uri, *names], capture_output=True, text=True,
                             check=True, timeout=120).stdout.strip()
        reader = MlflowReader(ReaderSettings(server.uri, server.uri, retry_for_seconds=30))
        # Models and versions of several names at once: 2.x answers a list with HTTP 400; read one at a time.
        versions = [v for page in reader.model_versions_of([*names, "missing"]) for v in page]
        assert sorted(v.name for v in versions) == sorted(names)
        assert reader.lists_refused == frozenset({"search_model_versions name"})
        models = [m.name for page in reader.registered_models_named(names) for m in page]
        assert sorted(models) == sorted(names)
        # Run ids: 2.x takes lists of them; 600 ids (one of them real) in requests gunicorn accepts.
        fake = [f"{n:032x}" for n in range(600)]
        of_runs = [v for page in reader.model_versions_of_runs([*fake, run]) for v in page]
        assert sorted(v.name for v in of_runs) == sorted(names)
        assert [r.info.run_id for r in reader.runs_by_id(["0", "1"], [*fake, run])] == [run]
        # What the connector used to send: a list of 100 ids, over gunicorn's request line limit.
        with pytest.raises(MlflowException, match="400|Request Line"):
            reader.call("search_model_versions", reader.registry.search_model_versions,
                        filter_string="run_id IN (" + ", ".join(f"'{r}'" for r in fake[:100]) + ")", max_results=10)
