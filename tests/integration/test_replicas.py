"""`run` deployed as replicas, on the real broker and MLflow: instances side by side, one producer at a time,
takeover on SIGKILL (during a snapshot and during incremental cycles), a rolling restart, webhook
deliveries that reach a standby; and two pipelines on one Kafka that never read each other's position.

The final MCP state must equal a clean run's, with no duplicate MCP."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from mlflow import MlflowClient

from connector.datahub.mapping import MappingSettings, model_group_urn, model_urn
from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.pipeline.dump import as_wrapper, read_mcps
from connector.pipeline.status import read_status
from tests.conftest import ConfigFactory, Kafka, read_to_end, run_cli
from tests.integration.test_crash import Process, _fill, _live_changes, converge_to_clean_run
from tests.integration.test_operations import _get, _metrics
from tests.integration.test_webhooks import SECRET, _body, _headers, _send

TAKEOVER_LIMIT_SECONDS = 30.0  # the bound: an MLflow change reaches the MCP topic this soon after a kill


def _instances(path: Path, tmp_path: Path, names: list[str]) -> dict[str, Process]:
    return {name: Process(["run", "-c", str(path), "--instance-id", name], tmp_path / f"{name}.log")
            for name in names}


def _wait(what: str, condition: Callable[[], object], seconds: float, processes: dict[str, Process]) -> object:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        dead = [name for name, p in processes.items() if p.proc is not None and not p.alive()]
        assert not dead, f"instances {dead} exited: see {processes[dead[0]].log}"
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.1)


def _log(process: Process) -> str:
    return process.log.read_text() if process.log.exists() else ""


def _holder(processes: dict[str, Process]) -> str | None:
    """The instance that took the producer role last, by the instances' logs (live ones only)."""
    latest: tuple[str, str] | None = None
    for name, process in processes.items():
        if not process.alive():
            continue
        for line in _log(process).splitlines():
            if f"producer role: taken by instance {name}" in line and (latest is None or line[:23] > latest[0]):
                latest = (line[:23], name)
    return latest[1] if latest else None


def _urns(cfg) -> set[str]:  # noqa: ANN001
    return {urn for urn, _ in read_mcps(cfg)}


@pytest.mark.slow
def test_three_instances_take_over_through_kills_and_a_rolling_restart(
        own_mlflow: MlflowServer, make_config: ConfigFactory, tmp_path: Path) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    _fill(client)
    path, cfg = make_config(own_mlflow.uri, {
        "producer": {"poll_interval_seconds": 1, "reconcile_interval_seconds": 40, "transaction_size": 40,
                     "watermark_overlap_seconds": 2},
        "consumer": {"batch_size": 50},
    })
    processes = _instances(path, tmp_path, ["r1", "r2", "r3"])
    settings = MappingSettings()
    stop_changes = threading.Event()
    made: Counter = Counter()
    changer = threading.Thread(target=_live_changes, args=(client, stop_changes, made), daemon=True)
    takeovers: list[float] = []
    try:
        for process in processes.values():
            process.start()
        # 1. SIGKILL of the holder during the first snapshot.
        holder = _wait("an instance to take the producer role", lambda: _holder(processes), 60, processes)
        started = _wait("the first snapshot to start",
                        lambda: re.search(r"snapshot (\S+) started", _log(processes[holder])), 60, processes)
        processes[holder].kill()
        snapshot_id = started.group(1)  # type: ignore[union-attr]
        assert f"snapshot {snapshot_id} complete" not in _log(processes[holder]), "killed after the snapshot ended"
        standbys = {n: p for n, p in processes.items() if n != holder}
        _wait("a standby to take the role and complete a snapshot", lambda: any(
            re.search(r"snapshot \S+ complete", _log(p)) for p in standbys.values()), 120, standbys)
        processes[holder].start()

        # 2. SIGKILLs of the holder during incremental cycles, under continuous MLflow changes: an MLflow
        #    change written right after each kill reaches the MCP topic in time.
        changer.start()
        rng = random.Random(20261207)
        for round_ in range(3):
            time.sleep(rng.uniform(2.0, 5.0))
            holder = _holder(processes)
            assert holder is not None
            processes[holder].kill()
            killed = time.monotonic()
            probe = f"takeover probe {round_}"
            client.create_registered_model(probe)
            urn = model_group_urn(probe, settings)
            standbys = {n: p for n, p in processes.items() if n != holder}
            _wait(f"{probe} on the MCP topic", lambda urn=urn: urn in _urns(cfg), 90, standbys)
            takeovers.append(time.monotonic() - killed)
            assert _holder(standbys) is not None
            processes[holder].start()

        # 3. A rolling restart of the three instances, still under changes: each stopped with SIGTERM (the
        #    role, if it holds it, is handed over at once) and started again before the next.
        for name, process in processes.items():
            _wait(f"{name} up", lambda p=process: _log(p).count("standing by for the producer role") >= p.starts,
                  60, processes)
            before = _log(process).count("standing by for the producer role")
            assert process.stop() == 0, f"{name} did not stop cleanly: see {process.log}"
            process.start()
            _wait(f"{name} back in the group", lambda p=process, b=before: _log(p).count(
                "standing by for the producer role") > b, 60, processes)
            time.sleep(2)
        stop_changes.set()
        changer.join(60)
        handovers = sum(_log(p).count("producer role: handed over") for p in processes.values())

        outcome, expected = converge_to_clean_run(own_mlflow.uri, make_config, cfg,
                                                  lambda: all(p.alive() for p in processes.values()),
                                                  f"replicas (logs in {tmp_path})")
        status = read_status(cfg)
    finally:
        stop_changes.set()
        for process in processes.values():
            if process.alive():
                process.stop()

    print(f"\nreplicas: takeovers after SIGKILL, kill -> MCP of a change written at the kill: "
          f"{', '.join(f'{t:.1f} s' for t in takeovers)}; {handovers} handovers in the rolling restart; live changes "
          f"{dict(made)}; {len(outcome.actual)} (URN, aspect) pairs match a clean run; duplicate MCPs: "
          f"{max(outcome.repeated, 0)}")
    outcome.check(expected)
    assert max(takeovers) <= TAKEOVER_LIMIT_SECONDS, takeovers
    assert handovers >= 1  # the holder was among the restarted: it handed the role over
    assert status.producer_role is not None and status.producer_role["holder"] in processes
    assert len(status.producer_role["standbys"]) == 2
    assert sorted(status.instances) == ["r1", "r2", "r3"]
    assert sorted(p for parts in status.instances.values() for p in parts) == [0, 1, 2]


def test_a_webhook_delivery_to_a_standby_is_applied_by_the_holder(
        own_mlflow: MlflowServer, make_config: ConfigFactory, tmp_path: Path) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    name = f"standby webhook model {uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    client.create_model_version(name, "s3://bucket/standby/1")
    ports = {"w1": free_port(), "w2": free_port()}
    operations = {"w1": free_port(), "w2": free_port()}
    first, cfg = make_config(own_mlflow.uri, {
        "producer": {"poll_interval_seconds": 120},  # polling cannot be what delivers the change below
        "webhooks": {"listen": f"127.0.0.1:{ports['w1']}", "secret": SECRET},
        "metrics": {"listen": f"127.0.0.1:{operations['w1']}", "check_interval_seconds": 1},
    }, name="w1.yml")
    # One pipeline, two instances: the same configuration but for the ports of the receiver and the metrics.
    paths = {"w1": first, "w2": tmp_path / "w2.yml"}
    paths["w2"].write_text(first.read_text().replace(f"127.0.0.1:{ports['w1']}", f"127.0.0.1:{ports['w2']}")
                           .replace(f"127.0.0.1:{operations['w1']}", f"127.0.0.1:{operations['w2']}"))

    def role(instance: str) -> float | None:
        return _metrics(f"http://127.0.0.1:{operations[instance]}").get(("mlflow_datahub_producer_role", ()))

    def partitions(instance: str) -> list[str]:
        return sorted(dict(labels)["partition"] for (name, labels), value
                      in _metrics(f"http://127.0.0.1:{operations[instance]}").items()
                      if name == "mlflow_datahub_assigned_partition" and value == 1)
    processes = {i: Process(["run", "-c", str(paths[i]), "--instance-id", i], tmp_path / f"{i}.log") for i in ports}
    urn = model_urn(name, "1", MappingSettings())

    def tagged() -> bool:
        for key, mcp in read_mcps(cfg):
            aspect = as_wrapper(mcp).aspect
            if key == urn and mcp.aspectName == "mlModelProperties" and \
                    (aspect.customProperties or {}).get("stage") == "canary":  # type: ignore[union-attr]
                return True
        return False

    try:
        processes["w1"].start()
        _wait("w1 to hold the role", lambda: _holder(processes) == "w1", 60, processes)
        processes["w2"].start()
        _wait("w2 standing by", lambda: "standing by" in _log(processes["w2"]), 60, processes)
        _wait("the first snapshot on the MCP topic", lambda: urn in _urns(cfg), 120, processes)
        # /metrics: the holder says 1, the standby 0; both consume a share of the partitions. /readyz: both ready.
        _wait("the role in both instances' metrics", lambda: role("w1") == 1 and role("w2") == 0, 30, processes)
        _wait("the partitions shared", lambda: sorted(partitions("w1") + partitions("w2")) == ["0", "1", "2"]
              and partitions("w1") and partitions("w2"), 60, processes)
        for instance in ("w1", "w2"):
            _wait(f"{instance} ready", lambda i=instance: _get(f"http://127.0.0.1:{operations[i]}/readyz")[0] == 200,
                  30, processes)
        metrics = _metrics(f"http://127.0.0.1:{operations['w1']}")
        since = metrics[("mlflow_datahub_producer_role_since_timestamp_seconds", ())]
        assert time.time() - 120 < since <= time.time()
        client.set_model_version_tag(name, "1", "stage", "canary")  # moves no timestamp
        body = _body("model_version_tag", "set", name)
        status, answer = _send(f"http://127.0.0.1:{ports['w2']}/webhooks/mlflow", body, _headers(body))
        assert status == 202, answer
        _wait("the tag, read by the holder after the standby's delivery", tagged, 30, processes)
        assert "webhook accepted" in _log(processes["w2"])
        assert "published 1 changed entities" in _log(processes["w1"])

        # After a takeover, the new holder applies a delivery that the old one never saw.
        processes["w1"].kill()
        client.set_model_version_tag(name, "1", "stage", "production")
        body = _body("model_version_tag", "set", name)
        status, answer = _send(f"http://127.0.0.1:{ports['w2']}/webhooks/mlflow", body, _headers(body))
        assert status == 202, answer
        _wait("the second tag, applied by the new holder", lambda: any(
            key == urn and mcp.aspectName == "mlModelProperties"
            and (as_wrapper(mcp).aspect.customProperties or {}).get("stage") == "production"  # type: ignore[union-attr]
            for key, mcp in read_mcps(cfg)), 60, {"w2": processes["w2"]})
        assert _holder(processes) == "w2"
        _wait("the new holder's metrics", lambda: role("w2") == 1 and partitions("w2") == ["0", "1", "2"], 30,
              {"w2": processes["w2"]})
    finally:
        for process in processes.values():
            if process.alive():
                process.stop()


def test_two_pipelines_on_one_kafka_never_read_each_others_position(
        own_mlflow: MlflowServer, mlflow_factory: Callable[[], MlflowServer], make_config: ConfigFactory,
        kafka: Kafka, tmp_path: Path) -> None:
    other_mlflow = mlflow_factory()
    for server, count in ((own_mlflow, 4), (other_mlflow, 3)):
        client = MlflowClient(server.uri, server.uri)
        for i in range(count):
            experiment = client.create_experiment(f"pipeline experiment {i} {uuid.uuid4().hex[:4]}")
            client.set_terminated(client.create_run(experiment).info.run_id)
        client.create_registered_model(f"pipeline model {uuid.uuid4().hex[:4]}")
    # Each its own change, state and MCP topics; the default-like rest shared: the producer-offsets topic,
    # the transactional-id prefix and the consumer group; no pipeline_name.
    shared = uuid.uuid4().hex[:8]
    common = {"kafka": {"consumer_group": f"shared-{shared}", "transactional_id_prefix": f"shared-{shared}",
                        "topics": {"producer_offsets": f"shared-{shared}.producer-offsets"}},
              "producer": {"poll_interval_seconds": 1}}
    one_path, one = make_config(own_mlflow.uri, common, name="one.yml")
    two_path, two = make_config(other_mlflow.uri, common, name="two.yml")
    # What an earlier version left in the shared topic: a position under the key both pipelines used then.
    old = Producer({"bootstrap.servers": kafka.bootstrap})
    old.produce(one.kafka.topics.producer_offsets, key=b"position:mlflow-datahub",
                value=json.dumps({"snapshot_seq": 41, "last_snapshot_ms": int(time.time() * 1000),
                                  "watermarks": {"runs": 4102444800000}, "known_summaries": True}).encode())
    old.flush(30)

    for path in (one_path, two_path, one_path, two_path):
        result = run_cli("snapshot", "-c", str(path))
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert "complete" in result.stdout and "(deletes: 0)" in result.stdout, result.stdout
    for cfg in (one, two):
        status = read_status(cfg)
        assert status.producer_position is not None and status.producer_position["snapshot_seq"] == 2
        assert status.last_complete_snapshot is not None and status.last_complete_snapshot["deletes"] == 0
        removed = [urn for urn, mcp in read_mcps(cfg) if mcp.aspectName == "status"
                   and json.loads(mcp.aspect.value).get("removed")]
        assert removed == []

    # Both pipelines running side by side: neither fences the other; each follows its own MLflow.
    processes = {"one": Process(["run", "-c", str(one_path), "--instance-id", "p"], tmp_path / "one.log"),
                 "two": Process(["run", "-c", str(two_path), "--instance-id", "p"], tmp_path / "two.log")}
    try:
        for process in processes.values():
            process.start()
        _wait("both holding their producer role", lambda: all(
            "producer role: taken" in _log(p) for p in processes.values()), 60, processes)
        for server, cfg in ((own_mlflow, one), (other_mlflow, two)):
            name = f"live model {uuid.uuid4().hex[:6]}"
            MlflowClient(server.uri, server.uri).create_registered_model(name)
            _wait(f"{name} on its pipeline's MCP topic", lambda n=name, c=cfg: model_group_urn(
                n, MappingSettings()) in _urns(c), 60, processes)
        time.sleep(3)
        assert all(p.alive() for p in processes.values())
    finally:
        for process in processes.values():
            if process.alive():
                assert process.stop() == 0
    for log in (_log(p) for p in processes.values()):
        assert "fenced" not in log, log[-3000:]

    # A recipe that points the other MLflow at the first pipeline's change topic stops, naming pipeline_name,
    # and writes nothing.
    wrong_path, wrong = make_config(other_mlflow.uri, {**common, "kafka": {
        **common["kafka"], "topics": {**one.kafka.topics.model_dump()}}}, name="wrong.yml")
    before = sum(1 for _ in read_to_end(kafka.bootstrap, one.kafka.topics.changes))
    result = run_cli("snapshot", "-c", str(wrong_path))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "holds the changes of another MLflow" in last and "pipeline_name" in last, last
    assert sum(1 for _ in read_to_end(kafka.bootstrap, one.kafka.topics.changes)) == before
