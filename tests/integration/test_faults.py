"""Faults and bad input, each on the real stack (Kafka, schema registry, MLflow servers):

- the broker restarts while `mlflow-datahub run` streams: nothing is lost, both sides carry on;
- MLflow is down for 30 s: retries with clear log lines, a snapshot due meanwhile deletes nothing;
- the schema registry is unreachable: nothing acknowledged that was not written, then exactly once;
- malformed records on the change topic go to the dead-letter topic, the consumer goes on;
- an MCP over the broker's message size is truncated the way DataHub does it, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from datahub.metadata.schema_classes import MLModelPropertiesClass, MLTrainingRunPropertiesClass
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.contract.envelope import source_block
from connector.datahub.mapping import MappingSettings, experiment_urn, model_urn, run_urn
from connector.devstack import stack
from connector.devstack.forwarder import Forwarder
from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.kafka.topics import ensure_topics
from connector.mlflow.reader import MlflowReader, reader_settings
from connector.pipeline.consumer import ChangeConsumer
from connector.pipeline.dump import read_mcps
from connector.pipeline.producer import ChangeProducer
from tests.conftest import REPO, ConfigFactory, Kafka, read_to_end, run_cli

# -- helpers ----------------------------------------------------------------------------------------


def wait_for(what: str, condition: Callable[[], bool], timeout: float, interval: float = 1.0,
             process: CliProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            process.check_alive()
        if time.monotonic() > deadline:
            detail = f"\nconnector log:\n{process.log()[-5000:]}\nthreads:\n{process.stacks()}" if process else ""
            raise AssertionError(f"gave up waiting {timeout:.0f} s for {what}{detail}")
        time.sleep(interval)


def aspects(cfg: ConnectorConfig) -> list[tuple[str, str, dict]]:
    """(URN, aspect name, aspect JSON) of every committed MCP, in topic order."""
    out = []
    for key, mcp in read_mcps(cfg):
        assert key == mcp.entityUrn
        assert mcp.aspect is not None
        out.append((key, str(mcp.aspectName), json.loads(mcp.aspect.value)))
    return out


def has_all(cfg: ConnectorConfig, wanted: set[tuple[str, str]]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return wanted <= {(urn, name) for urn, name, _ in aspects(cfg)}
        except KafkaException:  # the broker is restarting: look again
            return False
    return check


class Entities:
    """What a test created in MLflow, with the (URN, aspect) pairs DataHub must receive for it."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.wanted: set[tuple[str, str]] = set()
        self.primary: set[str] = set()

    def experiment_with_run(self, name: str, params: int = 2) -> str:
        experiment_id = self.client.create_experiment(name, tags={"phase": name})
        run = self.client.create_run(experiment_id, run_name=f"{name} run")
        run_id = run.info.run_id
        self.client.log_batch(run_id, metrics=[Metric("accuracy", 0.9, int(time.time() * 1000), 0)],
                              params=[Param(f"p{i}", str(i)) for i in range(params)])
        self.client.set_terminated(run_id)
        self.wanted |= {(experiment_urn(name), "containerProperties"), (experiment_urn(name), "status"),
                        (run_urn(run_id), "dataProcessInstanceProperties"),
                        (run_urn(run_id), "mlTrainingRunProperties"),
                        (run_urn(run_id), "dataProcessInstanceRunEvent")}
        self.primary |= {experiment_urn(name), run_urn(run_id)}
        return run_id


class CliProcess:
    """`mlflow-datahub <command> -c FILE` running in the background; stderr kept in a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.stderr_path = tmp_path / f"{args[0]}-{len(list(tmp_path.glob('*.stderr')))}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        # The real CLI; SIGUSR1 dumps every thread's stack into the log (see stacks()).
        launcher = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
                    "from connector.cli import main; sys.exit(main(sys.argv[1:]))")
        self.process = subprocess.Popen([sys.executable, "-c", launcher, *args], cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=self._stderr,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stacks(self) -> str:
        """Where every thread of the process is now (for a failure message)."""
        if self.process.poll() is None:
            before = len(self.log())
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(1)
            return self.log()[before:]
        return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"connector exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._stderr.close()


@pytest.fixture
def cli_processes(tmp_path: Path) -> Iterator[Callable[..., CliProcess]]:
    started: list[CliProcess] = []

    def start(*args: str) -> CliProcess:
        process = CliProcess(tmp_path, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def snapshot(path: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`mlflow-datahub snapshot -c FILE`; its log in the failure when it does not finish."""
    try:
        return run_cli("snapshot", "-c", str(path), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
        raise AssertionError(f"snapshot did not finish in {timeout:.0f} s:\n{stderr[-4000:]}") from None


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def base(own_mlflow: MlflowServer) -> Entities:
    """Content every test of the module finds in its own MLflow server."""
    entities = Entities(MlflowClient(own_mlflow.uri))
    entities.experiment_with_run("faults base")
    return entities


# -- malformed records ------------------------------------------------------------------------------


def test_malformed_records_go_to_dead_letter_topic(own_mlflow: MlflowServer, base: Entities, kafka: Kafka,
                                                   make_config: ConfigFactory) -> None:
    path, cfg = make_config(own_mlflow.uri)
    ensure_topics(cfg)
    topics = cfg.kafka.topics
    event = {"op": "UPDATE", "kind": "RUN", "key": "run:0123456789abcdef", "after": None,
             "source": source_block(own_mlflow.uri, own_mlflow.uri, 1_795_000_000_000), "ts_ms": 1_795_000_000_000}
    valid_header = codec.encode(event)[:codec.HEADER_SIZE]
    bad = {  # key -> (partition, value, what the error header must say)
        b"garbage": (0, b"\x00\x00\x00\x00\x07 this is not a change event", "C3 01"),
        b"tombstone": (1, None, "tombstone"),
        b"corrupt-body": (2, valid_header + b"\x02\x04\xff\xff", "corrupt Avro body"),
        b"run:0123456789abcdef": (0, codec.encode(event), "carries no entity state"),  # UPDATE without state
    }
    delivered: dict[bytes, tuple[int, int]] = {}

    def on_delivery(error: object, msg: object) -> None:
        assert error is None, error
        delivered[msg.key()] = (msg.partition(), msg.offset())  # type: ignore[attr-defined]

    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for key, (partition, value, _) in bad.items():
        producer.produce(topics.changes, key=key, value=value, partition=partition, on_delivery=on_delivery)
    assert producer.flush(30) == 0

    # The valid events come after the bad ones on every partition: a snapshot of MLflow.
    result = snapshot(path)
    assert result.returncode == 0, result.stderr[-4000:]
    no_traceback(result.stderr)

    dead = {m.key(): m for m in read_to_end(kafka.bootstrap, topics.dead_letter)}
    assert set(dead) == set(bad)
    for key, (partition, value, error) in bad.items():
        msg = dead[key]
        assert msg.value() == value
        headers = {k: v.decode() for k, v in msg.headers()}
        assert error in headers["error"], headers
        assert headers["source.topic"] == topics.changes
        assert (int(headers["source.partition"]), int(headers["source.offset"])) == delivered[key]
        assert headers["error.type"]
        where = f"malformed change event at {topics.changes}[{partition}]@{delivered[key][1]}"
        assert where in result.stderr and f"sent to {topics.dead_letter}" in result.stderr
    # The consumer went on: every entity of MLflow reached the MCP topic.
    assert base.wanted <= {(urn, name) for urn, name, _ in aspects(cfg)}


# -- schema registry unreachable --------------------------------------------------------------------


def committed_offsets(kafka: Kafka, group: str, topic: str, partitions: int) -> dict[int, int]:
    client = AdminClient({"bootstrap.servers": kafka.bootstrap})
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
    result = client.list_consumer_group_offsets([request])[group].result(30)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def consume_until(cfg: ConnectorConfig, targets: dict[int, int], instance: str
                  ) -> tuple[ChangeConsumer, threading.Event, threading.Thread]:
    """A ChangeConsumer running in a thread until it has read past `targets` (partition -> offset)."""
    consumer = ChangeConsumer(cfg, instance)
    stop = threading.Event()
    def past_targets(c: ChangeConsumer) -> bool:
        return all(c.positions.get(p, 0) > o for p, o in targets.items())

    thread = threading.Thread(target=consumer.run, args=(stop,), kwargs={"should_stop": past_targets}, daemon=True)
    thread.start()
    return consumer, stop, thread


def test_schema_registry_unreachable(own_mlflow: MlflowServer, base: Entities, kafka: Kafka,
                                     make_config: ConfigFactory, caplog: pytest.LogCaptureFixture) -> None:
    registry = kafka.registry.split("//", 1)[1].split("/", 1)
    host, port = registry[0].rsplit(":", 1)
    proxy = Forwarder((host, int(port)))  # refuses connections until opened, as a registry that is down
    proxied = f"http://127.0.0.1:{proxy.port}/{registry[1]}"
    try:
        _, cfg = make_config(own_mlflow.uri, {"kafka": {"schema_registry_url": proxied}})
        ensure_topics(cfg)
        topics = cfg.kafka.topics
        producer = ChangeProducer(cfg, MlflowReader(reader_settings(cfg)))
        summary = producer.snapshot()
        producer.close()
        assert summary.complete
        partitions = cfg.kafka.partitions

        # The consumer reads the events, cannot register the MCP schema, and acknowledges nothing.
        consumer, stop, thread = consume_until(cfg, summary.end_offsets, "faults-registry")
        try:
            def failures() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.name == "connector.consumer"
                        and "not written" in r.getMessage()]

            wait_for("two failed attempts to write", lambda: len(failures()) >= 2, 60, 0.2)
            assert f"schema registry at {proxied} unreachable" in failures()[0]
            assert "nothing acknowledged, retry 1 in 1 s" in failures()[0]
            assert all(o < 0 for o in committed_offsets(kafka, cfg.kafka.consumer_group, topics.changes,
                                                         partitions).values())
            assert list(read_to_end(kafka.bootstrap, topics.mcp)) == []
            assert list(read_to_end(kafka.bootstrap, topics.state)) == []
            assert consumer.stats.events == 0 and not consumer.positions

            proxy.open()
            thread.join(120)
            assert not thread.is_alive(), "consumer did not catch up after the registry came back"
        finally:
            stop.set()
            thread.join(30)
        assert any("written after" in r.getMessage() for r in caplog.records)
        # Committed: just past the last event of each partition (the SNAPSHOT_END marker).
        assert committed_offsets(kafka, cfg.kafka.consumer_group, topics.changes, partitions) == \
            {p: o + 1 for p, o in summary.end_offsets.items()}

        # Exactly once: the same as a consumer that never saw the registry down writes from the same events
        # (read back through the same registry address).
        written = aspects(cfg)
        assert len(written) == sum(consumer.stats.mcps.values()) > 0
        assert base.wanted <= {(urn, name) for urn, name, _ in written}
    finally:
        proxy.close()
    _, reference = make_config(own_mlflow.uri, {"kafka": {"topics": {"changes": topics.changes}}}, "ref.yml")
    ensure_topics(reference)
    _, ref_stop, ref_thread = consume_until(reference, summary.end_offsets, "faults-registry-ref")
    ref_thread.join(120)
    ref_stop.set()
    assert Counter(json.dumps(a, sort_keys=True) for a in written) == \
        Counter(json.dumps(a, sort_keys=True) for a in aspects(reference))


# -- an MCP over the broker's message size ----------------------------------------------------------

HUGE_PARAMS = 1500
HUGE_VALUE = 800  # characters per param value: 1500 x 800 = 1.2 MB of params


@pytest.fixture(scope="module")
def big_mlflow(mlflow_factory: Callable[[], MlflowServer]) -> tuple[MlflowServer, str]:
    """A server with a run of thousands of long params, and a model version trained by it."""
    server = mlflow_factory()
    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("oversize")
    run_id = client.create_run(experiment_id, run_name="huge").info.run_id
    for start in range(0, HUGE_PARAMS, 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=[Param(f"param_{i:05d}", f"{i:05d}" + "x" * (HUGE_VALUE - 5))
                                         for i in range(start, start + 100)])
    client.log_metric(run_id, "accuracy", 0.5)
    client.set_terminated(run_id)
    client.create_registered_model("oversize model")
    client.create_model_version("oversize model", f"runs:/{run_id}/model", run_id=run_id)
    return server, run_id


def check_truncated(cfg: ConnectorConfig, stderr: str, run_id: str) -> None:
    urn = run_urn(run_id)
    version = model_urn("oversize model", "1", MappingSettings())
    warnings = [line for line in stderr.splitlines() if " WARNING " in line and "truncated" in line]
    for entity, aspect in ((urn, "mlTrainingRunProperties"), (version, "mlModelProperties")):
        assert any(entity in line and f"aspect {aspect}" in line and f"of {HUGE_PARAMS}" in line
                   for line in warnings), warnings
    records = {(m.key().decode(), len(m.value())) for m in read_to_end(cfg.kafka.resolved_bootstrap(),
                                                                       cfg.kafka.topics.mcp)}
    assert all(size <= cfg.consumer.max_message_bytes for _, size in records)
    written = {(u, name): a for u, name, a in aspects(cfg)}
    for entity, aspect_class in ((urn, MLTrainingRunPropertiesClass), (version, MLModelPropertiesClass)):
        aspect = written[(entity, aspect_class.ASPECT_NAME)]
        assert aspect_class.from_obj(aspect).validate()
        kept = aspect["hyperParams"]
        assert 0 < len(kept) < HUGE_PARAMS
        # A prefix of the params, in order, values intact.
        assert kept == [{"name": f"param_{i:05d}", "value": f"{i:05d}" + "x" * (HUGE_VALUE - 5)}
                        for i in range(len(kept))]
    assert written[(urn, "mlTrainingRunProperties")]["trainingMetrics"] == [{"name": "accuracy", "value": "0.5"}]
    assert (urn, "dataProcessInstanceProperties") in written


def test_oversize_mcp_is_truncated_with_a_warning(big_mlflow: tuple[MlflowServer, str], kafka: Kafka,
                                                  make_config: ConfigFactory) -> None:
    """The huge run's change event (over 1 MB) travels on the change topic; its MCPs, over the MCP
    topic's message size, are truncated the way DataHub does it, each with a warning."""
    server, run_id = big_mlflow
    path, cfg = make_config(server.uri)
    result = snapshot(path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Message size too large" not in result.stderr
    no_traceback(result.stderr)
    check_truncated(cfg, result.stderr, run_id)


# -- MLflow down for 30 s ---------------------------------------------------------------------------


def test_mlflow_down_for_30_seconds(own_mlflow: MlflowServer, base: Entities, kafka: Kafka,
                                    make_config: ConfigFactory, cli_processes: Callable[..., CliProcess]) -> None:
    # A complete snapshot is due every 5 s, and one page per entity at 2 requests/s makes each
    # snapshot take seconds: MLflow goes down in the middle of one.
    path, cfg = make_config(own_mlflow.uri, {"producer": {"reconcile_interval_seconds": 5, "page_size": 1,
                                                          "max_requests_per_second": 2}})
    run = cli_processes("run", "-c", str(path))
    wait_for("the first snapshot on the MCP topic", has_all(cfg, base.wanted), 120, process=run)

    def snapshot_in_progress() -> str | None:
        started = re.findall(r"snapshot (\S+) started", run.log())
        return started[-1] if len(started) >= 2 and f"snapshot {started[-1]} complete" not in run.log() else None

    wait_for("a second snapshot to start", lambda: snapshot_in_progress() is not None, 60, 0.05,
             process=run)
    interrupted = snapshot_in_progress()
    own_mlflow.stop()
    try:
        down_at = len(run.log())
        time.sleep(30)
        run.check_alive()
    finally:
        own_mlflow.start()  # same port, same store

    after = Entities(MlflowClient(own_mlflow.uri))
    after.experiment_with_run("after mlflow outage")
    wait_for("the change made after the outage", has_all(cfg, after.wanted), 120, process=run)
    # The snapshot MLflow went down in resumed and completed, deleting nothing, and so did a
    # complete snapshot started after the change made after the outage had arrived.
    wait_for("the interrupted snapshot to complete",
             lambda: re.search(rf"snapshot {re.escape(str(interrupted))} complete: .*, 0 deletes",
                               run.log()[down_at:]) is not None, 60, process=run)
    seen_at = len(run.log())

    def later_snapshot_complete() -> bool:
        later = run.log()[seen_at:]
        started = re.search(r"snapshot (\S+) started", later)
        return started is not None and re.search(rf"snapshot {re.escape(started[1])} complete: .*, 0 deletes",
                                                 later) is not None

    wait_for("a complete snapshot started after that", later_snapshot_complete, 60, process=run)
    removed = [urn for urn, name, a in aspects(cfg) if name == "status" and a["removed"]]
    assert removed == []

    log = run.log()
    outage = log[down_at:]
    retries = [line for line in outage.splitlines() if " unreachable (" in line and "MLflow at " in line]
    assert len(retries) >= 2, outage[-3000:]
    assert all(" WARNING " in line and own_mlflow.uri in line and re.search(r"retry \d+ in \d+ s", line)
               for line in retries), retries
    assert "MLflow answers again" in outage
    assert outage.index(retries[0]) < outage.index(f"snapshot {interrupted} complete")
    no_traceback(log)
    assert run.terminate() == 0, run.log()[-3000:]


# -- the broker restarts mid-stream -----------------------------------------------------------------


@pytest.fixture
def own_kafka(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A broker of this test's own (connector.stack's Kafka, in its own root on free ports), so that
    restarting it disturbs nobody else's tests. Yields (stack root, bootstrap servers)."""
    root = tmp_path_factory.mktemp("faults-kafka")
    for var in ("MLFLOW_DATAHUB_KAFKA_PORT", "MLFLOW_DATAHUB_CONTROLLER_PORT", "MLFLOW_DATAHUB_REGISTRY_PORT",
                "MLFLOW_DATAHUB_MLFLOW_PORT"):
        monkeypatch.setenv(var, str(free_port()))
    try:
        stack.kafka_restart(root)  # not running yet: this starts it
    except stack.StackError as e:
        pytest.skip(f"cannot start a broker of connector.stack: {e}")
    try:
        status = next(s for s in stack.status(root) if s.name == "kafka")
        yield root, status.address
    finally:
        stack.down(root)


def test_broker_restart_mid_stream(own_mlflow: MlflowServer, base: Entities, own_kafka: tuple[Path, str],
                                   make_config: ConfigFactory, cli_processes: Callable[..., CliProcess]) -> None:
    root, bootstrap = own_kafka
    path, cfg = make_config(own_mlflow.uri, {"kafka": {"bootstrap_servers": bootstrap}})
    run = cli_processes("run", "-c", str(path))
    wait_for("the first snapshot on the MCP topic", has_all(cfg, base.wanted), 120, process=run)
    entities = Entities(MlflowClient(own_mlflow.uri))
    entities.experiment_with_run("before broker restart")
    wait_for("the change made before the restart", has_all(cfg, entities.wanted), 60, process=run)

    restart_at = len(run.log())
    restart = threading.Thread(target=stack.kafka_restart, args=(root,), name="kafka-restart")
    restart.start()
    wait_for("the broker to go down", lambda: "brokers are down" in run.log()[restart_at:], 60, 0.2, process=run)
    entities.experiment_with_run("during broker restart")
    restart.join(180)
    assert not restart.is_alive()
    entities.experiment_with_run("after broker restart")

    wait_for("every change on the MCP topic", has_all(cfg, entities.wanted | base.wanted), 180, 2, process=run)
    run.check_alive()
    # Every aspect of the MLflow entities once: nothing written twice by a batch retried across the
    # restart. (Shared URNs, such as a run's user, are written once per partition.)
    primary = entities.primary | base.primary
    written = Counter((urn, name, json.dumps(a, sort_keys=True)) for urn, name, a in aspects(cfg) if urn in primary)
    assert [k for k, n in written.items() if n > 1] == []

    log = run.log()
    outage = log[restart_at:]
    said = [line for line in outage.splitlines() if " WARNING connector.kafka: consumer: " in line
            and f"Kafka at {bootstrap}" in line and "keeps retrying" in line]
    assert said, outage[-4000:]
    # librdkafka reports every reconnect attempt; one line per kind of message is kept.
    assert len([line for line in outage.splitlines() if " librdkafka: " in line]) < 40, outage[-4000:]
    no_traceback(log)
    assert run.terminate() == 0, run.log()[-3000:]
