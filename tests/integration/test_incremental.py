"""Incremental change detection on a real MLflow and Kafka: after a snapshot, each cycle publishes
exactly what changed (watermarks, active runs, dependants), unchanged entities never again, and a
restarted producer carries on from its position in Kafka."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.contract.events import ChangeEvent
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.producer import ChangeProducer
from tests.conftest import ConfigFactory, Kafka, read_to_end


class Topic:
    """Reads the change topic; `new()` returns the events committed since the last call."""

    def __init__(self, kafka: Kafka, cfg: ConnectorConfig) -> None:
        self.kafka, self.topic, self.seen = kafka, cfg.kafka.topics.changes, 0

    def all(self) -> list[ChangeEvent]:
        events = [codec.decode(m.value()) for m in read_to_end(self.kafka.bootstrap, self.topic)]
        return sorted(events, key=lambda e: e["ts_ms"])

    def new(self) -> list[tuple[str, str]]:
        events = self.all()
        fresh, self.seen = events[self.seen:], len(events)
        return sorted((e["op"], e["key"]) for e in fresh if e["kind"] != "SNAPSHOT")


@pytest.fixture(scope="module")
def client(own_mlflow: MlflowServer) -> MlflowClient:
    return MlflowClient(own_mlflow.uri, own_mlflow.uri)


@pytest.fixture
def producer_and_topic(own_mlflow: MlflowServer, make_config: ConfigFactory, kafka: Kafka
                       ) -> Iterator[tuple[ChangeProducer, Topic, ConnectorConfig]]:
    # The wide look-back for runs from slow clocks once only (at the first cycle), so that every other
    # cycle here shows what the watermarks alone find.
    _, cfg = make_config(own_mlflow.uri, {"producer": {"watermark_overlap_seconds": 1,
                                                       "clock_skew_check_seconds": 3600}})
    ensure_topics(cfg)
    producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    yield producer, Topic(kafka, cfg), cfg
    producer.close()


def test_each_cycle_publishes_what_changed(client: MlflowClient, producer_and_topic: tuple) -> None:
    producer, topic, cfg = producer_and_topic
    exp = client.create_experiment("incremental")
    done = client.create_run(exp, run_name="done").info.run_id
    client.log_metric(done, "loss", 0.5)
    client.set_terminated(done)
    active = client.create_run(exp, run_name="active").info.run_id
    client.create_registered_model("inc model")
    client.create_model_version("inc model", f"runs:/{done}/m", run_id=done)

    summary = producer.snapshot()
    assert summary.complete
    assert ("READ", f"run:{active}") in topic.new()
    # The snapshot read no signature: its features pass (`run` makes it between cycles) reads version 1's.
    assert summary.signatures_unread == 1
    producer.read_features()
    assert topic.new() == [("UPDATE", "model_version:inc model/1")]

    # Nothing changed: nothing published, a handful of requests (once past the watermark overlap).
    time.sleep(1.2)
    producer.cycle()
    before = producer.reader.requests
    calls_before = dict(producer.reader.requests_by_call)
    assert producer.cycle() == 0
    idle_requests = producer.reader.requests - before
    idle_calls = {k: v - calls_before.get(k, 0) for k, v in producer.reader.requests_by_call.items()
                  if v != calls_before.get(k, 0)}
    # (no "model version artifact": the versions' signatures were read by the features pass, once)
    assert idle_calls == {"search_experiments": 1, "search_registered_models": 1, "search_model_versions": 1,
                          "search_runs": 1, "search_logged_models": 1}, idle_calls
    assert idle_requests == 5
    assert topic.new() == []

    # An active run logs a metric; a new run starts.
    client.log_metric(active, "accuracy", 0.7)
    fresh = client.create_run(exp, run_name="fresh").info.run_id
    producer.cycle()
    assert topic.new() == sorted([("UPDATE", f"run:{active}"), ("CREATE", f"run:{fresh}")])

    # The active run finishes: seen although its start time is behind the watermark.
    client.set_terminated(active, "FAILED")
    producer.cycle()
    events = [e for e in topic.all() if e["key"] == f"run:{active}"]
    assert events[-1]["after"]["status"] == "FAILED" and events[-1]["after"]["end_time"]
    topic.new()

    # A new version from the finished run: the version, its model (latest version) and its run
    # (outputs) are all published.
    client.create_model_version("inc model", f"runs:/{done}/m2", run_id=done)
    producer.cycle()
    assert topic.new() == sorted([("CREATE", "model_version:inc model/2"),
                                  ("UPDATE", "registered_model:inc model"), ("UPDATE", f"run:{done}")])
    run_event = [e for e in topic.all() if e["key"] == f"run:{done}"][-1]
    assert [v["version"] for v in run_event["after"]["model_versions"]] == ["1", "2"]

    # A stage transition; then a version deleted: DELETE, and its run and model brought up to date.
    client.transition_model_version_stage("inc model", "1", "Production")
    producer.cycle()
    # (the model's per-stage latest versions change with it)
    assert topic.new() == sorted([("UPDATE", "model_version:inc model/1"), ("UPDATE", "registered_model:inc model")])
    client.delete_model_version("inc model", "2")
    producer.cycle()
    assert topic.new() == sorted([("DELETE", "model_version:inc model/2"),
                                  ("UPDATE", "registered_model:inc model"), ("UPDATE", f"run:{done}")])

    # A renamed experiment: the experiment and every run of it (they carry its name).
    client.rename_experiment(exp, "incremental renamed")
    producer.cycle()
    assert topic.new() == sorted([("UPDATE", f"experiment:{exp}"), ("UPDATE", f"run:{active}"),
                                  ("UPDATE", f"run:{done}"), ("UPDATE", f"run:{fresh}")])

    # An edit to a finished run moves no timestamp: the reconciliation (a complete snapshot) has it (or,
    # for a run started within max_clock_skew_seconds, the next cycle that looks back that far).
    client.log_metric(done, "loss", 0.25)
    producer.cycle()
    assert topic.new() == []
    producer.snapshot()
    reads = [e for e in topic.all() if e["key"] == f"run:{done}"]
    assert {m["key"]: m["value"] for m in reads[-1]["after"]["metrics"]}["loss"] == 0.25

    # Same number of requests when idle as before the store grew.
    time.sleep(1.2)
    producer.cycle()
    before = producer.reader.requests
    producer.cycle()
    assert producer.reader.requests - before == idle_requests


def test_restarted_producer_continues_without_republishing(client: MlflowClient, own_mlflow: MlflowServer,
                                                           producer_and_topic: tuple) -> None:
    producer, topic, cfg = producer_and_topic
    producer.snapshot()
    client.create_registered_model("restart model")
    time.sleep(1.5)  # past the watermark overlap (1 s here)
    client.create_registered_model("filler model")
    producer.cycle()
    topic.new()
    producer.close()

    again = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    try:
        assert again.position.snapshot_seq == producer.position.snapshot_seq
        assert again.position.watermarks == producer.position.watermarks
        assert again.published == producer.published
        assert again.snapshot_due() is False
        assert again.cycle() == 0
        assert topic.new() == []
        client.set_registered_model_tag("restart model", "k", "v")  # moves no timestamp
        client.create_registered_model("after restart")
        again.cycle()
        assert topic.new() == [("CREATE", "registered_model:after restart")]
        # A webhook-triggered targeted read sees the tag at once.
        assert again.refresh_model(["restart model"]) == 1
        assert topic.new() == [("UPDATE", "registered_model:restart model")]
    finally:
        again.close()


def test_logged_models_are_published_by_snapshot_and_cycles(client: MlflowClient, producer_and_topic: tuple) -> None:
    producer, topic, cfg = producer_and_topic
    exp = client.create_experiment("logged models")
    first = client.create_logged_model(exp, name="first", params={"alpha": "0.1"}, model_type="sklearn")
    producer.snapshot()
    assert ("READ", f"logged_model:{first.model_id}") in topic.new()
    second = client.create_logged_model(exp, name="second")
    client.finalize_logged_model(first.model_id, "READY")
    producer.cycle()
    assert topic.new() == sorted([("CREATE", f"logged_model:{second.model_id}"),
                                  ("UPDATE", f"logged_model:{first.model_id}")])
    event = [e for e in topic.all() if e["key"] == f"logged_model:{first.model_id}"][-1]
    assert event["after"]["status"] == "READY" and event["after"]["params"] == [{"key": "alpha", "value": "0.1"}]
    assert producer.cycle() == 0


def test_a_new_partition_count_stops_the_producer(own_mlflow: MlflowServer, producer_and_topic: tuple) -> None:
    from confluent_kafka.admin import NewPartitions

    from connector.config import ConfigError
    from connector.kafka.topics import admin

    producer, topic, cfg = producer_and_topic
    producer.snapshot()
    producer.close()
    client = admin(cfg)
    futures = client.create_partitions([NewPartitions(cfg.kafka.topics.changes, 4)])
    for future in futures.values():
        future.result(30)
    with pytest.raises(ConfigError) as error:
        ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
    assert "has 4 partitions, but the connector wrote it with 3" in str(error.value)


def test_cycles_start_every_poll_interval_however_long_they_take(own_mlflow: MlflowServer,
                                                                make_config: ConfigFactory) -> None:
    """The poll interval is the period of the cycles, from start to start: a write waits at most one
    interval for the cycle that reads it, whatever a cycle costs (here about 1.2 s, with MLflow
    requests rate-limited to 4 per second)."""
    import threading

    _, cfg = make_config(own_mlflow.uri, {"producer": {"poll_interval_seconds": 2,
                                                       "max_requests_per_second": 4}})
    ensure_topics(cfg)
    starts: list[float] = []
    durations: list[float] = []

    class Timed(ChangeProducer):
        def cycle(self) -> int:
            starts.append(time.monotonic())
            try:
                return super().cycle()
            finally:
                durations.append(time.monotonic() - starts[-1])

    producer = Timed(cfg, MlflowReader(reader_settings(cfg)))
    stop = threading.Event()
    thread = threading.Thread(target=producer.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(starts) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
        producer.close()
    assert len(starts) >= 4
    assert min(durations) >= 1.0, durations  # five rate-limited requests
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(1.9 <= g <= 2.6 for g in gaps), (gaps, durations)


@pytest.mark.parametrize("skew_hours", [-1, 1], ids=["client clock an hour behind", "an hour ahead"])
def test_runs_from_clients_with_skewed_clocks_are_picked_up(client: MlflowClient, own_mlflow: MlflowServer,
                                                            make_config: ConfigFactory, kafka: Kafka,
                                                            skew_hours: int) -> None:
    """A run's start_time is its client's clock. One an hour behind is still found (by a cycle that looks
    back max_clock_skew_seconds); one an hour ahead is found too, and does not move the watermark past the
    producer's clock (a run logged after it with a correct clock is still found)."""
    _, cfg = make_config(own_mlflow.uri, {"producer": {"watermark_overlap_seconds": 1,
                                                       "clock_skew_check_seconds": 0.001}})
    ensure_topics(cfg)
    producer, topic = ChangeProducer(cfg, MlflowReader(reader_settings(cfg))), Topic(kafka, cfg)
    try:
        exp = client.create_experiment(f"skewed clocks {skew_hours}")
        assert producer.snapshot().complete
        topic.new()
        now = int(time.time() * 1000)
        skewed = client.create_run(exp, run_name="skewed", start_time=now + skew_hours * 3600 * 1000).info.run_id
        time.sleep(1.2)
        producer.cycle()
        assert ("CREATE", f"run:{skewed}") in topic.new()
        assert producer.position.watermarks["runs"] <= int(time.time() * 1000)
        later = client.create_run(exp, run_name="correct clock").info.run_id
        time.sleep(1.2)
        producer.cycle()
        assert ("CREATE", f"run:{later}") in topic.new()
    finally:
        producer.close()
