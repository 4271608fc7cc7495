"""Secured Kafka, end to end, on a real broker that requires SASL (and TLS): the local stack's broker
with its secured listeners (`stack up --secure`: SASL_PLAINTEXT and SASL_SSL, PLAIN and SCRAM-SHA-512,
a certificate signed by a local CA), started once for this module in a root of its own, on free ports.
The schema registry is the session's (`kafka` fixture); MLflow holds the demo content.

- SASL_SSL with SCRAM-SHA-512, written once in `kafka.connection_config`: snapshot, dump, replay, and
  produce / consume / run as processes until MCPs arrive, then SIGTERM;
- SASL_PLAINTEXT with PLAIN; the older style (a datahub-kafka sink recipe, the settings in its
  `producer_config` only) for every client;
- a wrong password, a mechanism the broker does not offer, an untrusted CA: every command exits 1
  within 30 s, its last line says which, and the password is nowhere in its output;
- a command that loses its authentication while it runs says so in a warning line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.config import ConnectorConfig, parse
from connector.devstack import secure, stack
from connector.devstack.installs import check_java
from connector.devstack.layout import SecureListeners
from connector.devstack.mlflow_server import MlflowServer
from connector.pipeline.dump import read_mcps
from tests.conftest import REPO, ConfigFactory, environment, private_stack_env, run_cli

FAIL_WITHIN_S = 30.0
COMMANDS = ("produce", "consume", "run", "snapshot", "replay", "dump")


@dataclass(frozen=True)
class Secured:
    """The module's secured broker."""

    env: dict[str, str]  # its root and ports, for a restart
    plaintext: str
    listeners: SecureListeners
    password: str

    def scram_ssl(self, **changes: str) -> dict[str, str]:
        settings = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": self.listeners.username, "sasl.password": self.password,
                    "ssl.ca.location": str(self.listeners.ca_location)}
        return {**settings, **changes}

    def plain(self) -> dict[str, str]:
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                "sasl.username": self.listeners.username, "sasl.password": self.password}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured-stack")
    env = private_stack_env(root)
    with environment(env):
        plaintext, listeners = stack.kafka_up(secure=True)
    try:
        assert listeners is not None
        password = listeners.client_settings()["sasl.password"]
        yield Secured(env=env, plaintext=plaintext, listeners=listeners, password=password)
    finally:
        with environment(env):
            stack.down()


def _config(make_config: ConfigFactory, mlflow: MlflowServer, bootstrap: str, connection: dict[str, str],
            name: str) -> tuple[Path, ConnectorConfig]:
    return make_config(mlflow.uri, {"kafka": {"bootstrap_servers": bootstrap, "connection_config": connection}},
                       name=name)


def _sink_recipe(make_config: ConfigFactory, mlflow: MlflowServer, bootstrap: str, producer_config: dict[str, str],
                 name: str) -> tuple[Path, ConnectorConfig]:
    """A recipe as DataHub's datahub-kafka sink has it: connection and security settings in the sink's
    `connection` (its `producer_config`), the MCP topic in its `topic_routes`; `kafka` has only the
    connector's own topics, group and ids."""
    path, _ = make_config(mlflow.uri, name=name)
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    kafka = data["kafka"]
    del kafka["bootstrap_servers"]
    registry = kafka.pop("schema_registry_url")
    mcp = kafka["topics"].pop("mcp")
    data["sink"] = {"type": "datahub-kafka", "config": {
        "connection": {"bootstrap": bootstrap, "schema_registry_url": registry, "producer_config": producer_config},
        "topic_routes": {"MetadataChangeProposal": mcp}}}
    path.write_text(yaml.safe_dump(data))
    return path, parse(data)


def _ok(result: subprocess.CompletedProcess[str], secret: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert secret not in output
    return result.stdout


def _snapshot_and_dump(path: Path, cfg: ConnectorConfig, tmp_path: Path, secret: str) -> int:
    out = _ok(run_cli("snapshot", "-c", str(path), timeout=180), secret)
    assert ": complete" in out
    dumped = tmp_path / f"{path.stem}.json"
    out = _ok(run_cli("dump", "-c", str(path), "--out", str(dumped), timeout=120), secret)
    count = int(out.split()[0])
    assert count > 50 and dumped.is_file()
    assert count == sum(1 for _ in read_mcps(cfg))  # the test's own secured reader agrees
    return count


# -- every command, secured -------------------------------------------------------------------------


def test_snapshot_dump_replay_over_sasl_ssl_with_scram(secured: Secured, demo_mlflow: MlflowServer,
                                                       make_config: ConfigFactory, tmp_path: Path) -> None:
    path, cfg = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(), "scram.yml")
    count = _snapshot_and_dump(path, cfg, tmp_path, secured.password)
    out = _ok(run_cli("replay", "-c", str(path), "--from-beginning", timeout=180), secured.password)
    assert "events" in out
    assert sum(1 for _ in read_mcps(cfg)) >= count


class Command:
    """`mlflow-datahub ARGS` as a process, its output in files."""

    def __init__(self, tmp_path: Path, name: str, *args: str) -> None:
        self.name = name
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "wb") as stdout, open(self.err, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "connector.cli", *args], cwd=REPO, stdout=stdout,
                                            stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        self.seconds: float | None = None

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def last_line(self) -> str:
        lines = [line for line in self.err.read_text().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and self.seconds is None:
            self.seconds = time.monotonic() - self.started
        return code

    def stop(self, timeout: float = 60.0) -> int:
        if self.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM:\n"
                                 f"{self.output()[-3000:]}") from None
        return self.process.returncode


def _wait(what: str, condition: Callable[[], bool], timeout: float, commands: list[Command]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for command in commands:
            assert command.poll() is None, f"{command.name} exited ({what}):\n{command.output()[-3000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n" + "\n".join(
            f"--- {c.name}\n{c.output()[-2000:]}" for c in commands)
        time.sleep(1.0)


def _mcps(cfg: ConnectorConfig) -> Callable[[], bool]:
    def any_mcp() -> bool:
        try:
            return any(True for _ in read_mcps(cfg))
        except Exception:  # noqa: BLE001 - the topic may not exist yet
            return False
    return any_mcp


def test_produce_consume_and_run_over_sasl_ssl_with_scram(secured: Secured, demo_mlflow: MlflowServer,
                                                          make_config: ConfigFactory, tmp_path: Path) -> None:
    pair, pair_cfg = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(), "pair.yml")
    alone, alone_cfg = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(), "run.yml")
    commands = [Command(tmp_path, "produce", "produce", "-c", str(pair)),
                Command(tmp_path, "consume", "consume", "-c", str(pair), "--instance-id", "secured-consume"),
                Command(tmp_path, "run", "run", "-c", str(alone), "--instance-id", "secured-run")]
    try:
        _wait("MCPs from produce + consume and from run", lambda: _mcps(pair_cfg)() and _mcps(alone_cfg)(), 150,
              commands)
    finally:
        codes = {c.name: c.stop() for c in commands}
    assert codes == {"produce": 0, "consume": 0, "run": 0}, "\n".join(c.output()[-2000:] for c in commands)
    for command in commands:
        assert secured.password not in command.output()


def test_sasl_plaintext_with_plain(secured: Secured, demo_mlflow: MlflowServer, make_config: ConfigFactory,
                                   tmp_path: Path) -> None:
    path, cfg = _config(make_config, demo_mlflow, secured.listeners.sasl_plaintext, secured.plain(), "plain.yml")
    _snapshot_and_dump(path, cfg, tmp_path, secured.password)


def test_settings_only_in_a_sink_recipes_producer_config_secure_every_client(
        secured: Secured, demo_mlflow: MlflowServer, make_config: ConfigFactory, tmp_path: Path) -> None:
    path, cfg = _sink_recipe(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(), "recipe.yml")
    assert cfg.kafka.connection_config == {} and cfg.kafka.producer_config["sasl.mechanism"] == "SCRAM-SHA-512"
    # snapshot: admin, transactional producers, the group consumer, state readers; dump: a reader.
    count = _snapshot_and_dump(path, cfg, tmp_path, secured.password)
    # replay: the lag probe, state readers, the group consumer, a transactional writer.
    _ok(run_cli("replay", "-c", str(path), "--from-beginning", timeout=180), secured.password)
    assert sum(1 for _ in read_mcps(cfg)) >= count


# -- refused connections ----------------------------------------------------------------------------


def _all_fail(tmp_path: Path, path: Path, commands: tuple[str, ...], secrets: list[str],
              at_once: int = 3) -> list[Command]:
    """Each command on `path` (`at_once` at a time: the suite's machine has 2 cores, and the time
    measured is the connector's, not a queue for the CPU); all must exit 1 within FAIL_WITHIN_S of
    their start, with no secret shown."""
    extra = {"replay": ["--from-beginning"], "dump": ["--out", str(tmp_path / "never.json")]}
    started: list[Command] = []
    for first in range(0, len(commands), at_once):
        wave = [Command(tmp_path, f"{path.stem}-{name}", name, "-c", str(path), *extra.get(name, []))
                for name in commands[first:first + at_once]]
        started += wave
        deadline = time.monotonic() + FAIL_WITHIN_S
        try:
            while any(c.poll() is None for c in wave) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for command in wave:
                if command.poll() is None:
                    os.killpg(command.process.pid, signal.SIGKILL)
                    command.process.wait(10)
    for command in started:
        assert command.seconds is not None and command.seconds <= FAIL_WITHIN_S, (
            f"{command.name} still running after {FAIL_WITHIN_S:.0f} s:\n{command.output()[-3000:]}")
        assert command.process.returncode == 1, command.output()[-3000:]
        for secret in secrets:
            assert secret not in command.output(), command.name
    return started


def test_a_wrong_password_stops_every_command(secured: Secured, demo_mlflow: MlflowServer,
                                              make_config: ConfigFactory, tmp_path: Path) -> None:
    wrong = "wrong-" + secured.password[::-1]
    path, _ = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(**{
        "sasl.password": wrong}), "wrong-password.yml")
    for command in _all_fail(tmp_path, path, COMMANDS, [secured.password, wrong]):
        line = command.last_line()
        assert line.startswith("mlflow-datahub: configuration error: kafka.connection_config.sasl.password: "
                               "authentication failed (SASL SCRAM-SHA-512, user 'connector') at Kafka "
                               f"{secured.listeners.sasl_ssl}"), (command.name, line)
        assert "check kafka.connection_config.sasl.username and kafka.connection_config.sasl.password" in line


def test_a_mechanism_the_broker_does_not_offer(secured: Secured, demo_mlflow: MlflowServer,
                                               make_config: ConfigFactory, tmp_path: Path) -> None:
    path, _ = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(**{
        "sasl.mechanism": "SCRAM-SHA-256"}), "mechanism.yml")
    for command in _all_fail(tmp_path, path, ("snapshot", "consume"), [secured.password]):
        assert command.last_line() == (
            "mlflow-datahub: configuration error: kafka.connection_config.sasl.mechanism: SASL mechanism SCRAM-SHA-256 "
            f"is not offered by Kafka at {secured.listeners.sasl_ssl} (it offers PLAIN, SCRAM-SHA-512); check "
            "kafka.connection_config.sasl.mechanism"), command.name


def test_an_untrusted_certificate_authority(secured: Secured, demo_mlflow: MlflowServer,
                                            make_config: ConfigFactory, tmp_path: Path) -> None:
    other_ca = secure.make_ca(tmp_path / "other-ca", secure.keytool(check_java()), "a CA that signed nothing here")
    path, _ = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(**{
        "ssl.ca.location": str(other_ca)}), "untrusted.yml")
    for command in _all_fail(tmp_path, path, ("run", "dump"), [secured.password]):
        line = command.last_line()
        assert line.startswith("mlflow-datahub: configuration error: kafka.connection_config.ssl.ca.location: TLS "
                               "handshake failed (certificate verify failed"), (command.name, line)
        assert f"with Kafka at {secured.listeners.sasl_ssl}; check kafka.connection_config.ssl.ca.location" in line


def test_authentication_lost_while_running_is_said(secured: Secured, demo_mlflow: MlflowServer,
                                                   make_config: ConfigFactory, tmp_path: Path) -> None:
    """A user removed while `consume` runs (credentials rotated, then the broker restarted): the
    reconnecting clients are refused, and a warning line says so (librdkafka retries; no silent hang).
    Last in the module: it restarts the broker."""
    user, password = "rotated-user", "rotated-pw-" + secured.password[:8]
    secure.upsert_scram_user(secured.plaintext, user, password)
    path, _ = _config(make_config, demo_mlflow, secured.listeners.sasl_ssl, secured.scram_ssl(**{
        "sasl.username": user, "sasl.password": password}), "rotated.yml")
    consumer = Command(tmp_path, "rotated-consume", "consume", "-c", str(path), "--instance-id", "rotated")
    try:
        _wait("the consumer to start", lambda: "consumer rotated reading" in consumer.err.read_text(), 60, [consumer])
        secure.delete_scram_user(secured.plaintext, user)
        with environment(secured.env):
            stack.kafka_restart()
        _wait("a warning that authentication failed",
              lambda: "authentication failed (SASL SCRAM-SHA-512, user 'rotated-user')" in consumer.err.read_text(),
              60, [consumer])
    finally:
        consumer.stop()
    warnings = [line for line in consumer.err.read_text().splitlines() if "authentication failed" in line]
    assert any("WARNING" in line and "librdkafka keeps retrying" in line for line in warnings), warnings
    assert password not in consumer.output() and secured.password not in consumer.output()
