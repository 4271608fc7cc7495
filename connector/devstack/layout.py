"""A real local stack on loopback, without Docker: Kafka (KRaft), a schema registry and MLflow.

Two folders are involved:

* the *cache* (``MLFLOW_DATAHUB_CACHE_DIR``, default ``<repo>/.cache/downloads``) holds what is
  downloaded once with Maven: the Kafka 4.4.0 jars and the unpacked Apicurio Registry
  2.6.13.Final. It can be shared by any number of runtime roots (tests use their own roots).
* the *root* (``MLFLOW_DATAHUB_STACK_DIR``, default ``<repo>/.cache/stack``) holds one stack's
  runtime state: ``<root>/<service>/`` with its data, its log file, ``pid`` and ``launch.json``
  (the exact command line that was started, so a recycled pid is never mistaken for ours).

Every install step is atomic (download into a temporary folder, rename when complete) and
guarded by a file lock, as is every start/stop, so concurrent callers do not race.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from connector.errors import OperatorError

log = logging.getLogger("connector.stack")

KAFKA = "kafka"
REGISTRY = "schema-registry"
MLFLOW = "mlflow"
SERVICES: tuple[str, ...] = (KAFKA, REGISTRY, MLFLOW)

KAFKA_VERSION = "4.4.0"
# Kafka 4.4 logs through SLF4J 1.7 and ships log4j-api/log4j-core 2.25.5; this is the matching binding.
LOG4J_VERSION = "2.25.5"
APICURIO_VERSION = "2.6.13.Final"  # 3.x needs Java 21
MIN_JAVA = 17

HOST = "127.0.0.1"
CCOMPAT_PATH = "/apis/ccompat/v7"
# The dev stack's JVMs are short-lived and share a small machine with the work they serve: a small heap,
# the serial collector, and the C1 compiler only (TieredStopAtLevel=1). C2 would spend seconds of CPU
# compiling the broker's hot paths during the first minutes of load (3.2 s of the broker's 7.3 s over a
# x10 snapshot, benchmark (c)), CPU that the connector and MLflow need on 2 cores; C1 code served the
# same load with no more CPU in the request handlers.
JVM_LIGHT = ["-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
             "-Djava.awt.headless=true"]

ENV_STACK_DIR = "MLFLOW_DATAHUB_STACK_DIR"
ENV_CACHE_DIR = "MLFLOW_DATAHUB_CACHE_DIR"
ENV_TIMEOUT = "MLFLOW_DATAHUB_STARTUP_TIMEOUT"
PORT_ENV: dict[str, int] = {
    "MLFLOW_DATAHUB_KAFKA_PORT": 19092,
    "MLFLOW_DATAHUB_CONTROLLER_PORT": 19093,
    "MLFLOW_DATAHUB_REGISTRY_PORT": 18081,
    "MLFLOW_DATAHUB_MLFLOW_PORT": 15000,
    # The broker's secured listeners (`stack up --secure`): SASL without and with TLS.
    "MLFLOW_DATAHUB_KAFKA_SASL_PORT": 19094,
    "MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT": 19095,
}
DEFAULT_STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
LOG_FILES = {KAFKA: "kafka.log", REGISTRY: "registry.log", MLFLOW: "mlflow.log"}

# The secured listeners: their names are their security protocols.
SASL_PLAINTEXT = "SASL_PLAINTEXT"
SASL_SSL = "SASL_SSL"
SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-512")

# Popen objects of the services this process started, so that they are reaped (no zombies) and
# Python does not warn about them being garbage collected while still running.
children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(OperatorError):
    """The stack could not be brought into the requested state; the message says why."""


@dataclass(frozen=True)
class SecureListeners:
    """How to reach the broker's secured listeners (`stack up --secure`). The password is not here: it
    is in `client_properties` (librdkafka's `key=value` format, SASL_SSL with SCRAM-SHA-512), read
    from there by whoever needs it, so that it is never printed."""

    sasl_plaintext: str  # host:port, SASL without TLS
    sasl_ssl: str  # host:port, SASL over TLS (the broker's certificate is signed by ca_location)
    mechanisms: tuple[str, ...]
    username: str
    ca_location: Path  # PEM of the local CA, for librdkafka's ssl.ca.location
    client_properties: Path

    def as_env_lines(self) -> list[str]:
        return [
            f"KAFKA_SASL_SSL_BOOTSTRAP_SERVERS={self.sasl_ssl}",
            f"KAFKA_SASL_PLAINTEXT_BOOTSTRAP_SERVERS={self.sasl_plaintext}",
            f"KAFKA_SASL_MECHANISMS={','.join(self.mechanisms)}",
            f"KAFKA_SASL_USERNAME={self.username}",
            f"KAFKA_SSL_CA_LOCATION={self.ca_location}",
            f"KAFKA_CLIENT_PROPERTIES={self.client_properties}",
        ]

    def client_settings(self) -> dict[str, str]:
        """librdkafka settings of the SASL_SSL listener with SCRAM-SHA-512, password included (for tests)."""
        return read_properties(self.client_properties)


def read_properties(path: Path) -> dict[str, str]:
    """A `key=value` properties file (comments and blank lines skipped); empty if it cannot be read."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap_servers: str
    schema_registry_url: str
    mlflow_tracking_uri: str
    secure: SecureListeners | None = None  # when the broker runs with its secured listeners

    def as_env_lines(self) -> list[str]:
        return [
            f"KAFKA_BOOTSTRAP_SERVERS={self.kafka_bootstrap_servers}",
            f"SCHEMA_REGISTRY_URL={self.schema_registry_url}",
            f"MLFLOW_TRACKING_URI={self.mlflow_tracking_uri}",
        ]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    log_file: Path
    secure: SecureListeners | None = None  # the broker's secured listeners, when it runs with them


def log_progress(message: str) -> None:
    log.info("%s", message)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_root() -> Path:
    """The runtime folder: env MLFLOW_DATAHUB_STACK_DIR, else <repo>/.cache/stack."""
    env = os.environ.get(ENV_STACK_DIR)
    return Path(env).expanduser() if env else _repo_root() / ".cache" / "stack"


def default_cache_dir() -> Path:
    """The shared download folder: env MLFLOW_DATAHUB_CACHE_DIR, else <repo>/.cache/downloads."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else _repo_root() / ".cache" / "downloads"


# --------------------------------------------------------------------------------------------
# configuration and layout


@dataclass(frozen=True)
class Layout:
    root: Path
    cache: Path
    kafka_port: int
    controller_port: int
    registry_port: int
    mlflow_port: int
    sasl_port: int = PORT_ENV["MLFLOW_DATAHUB_KAFKA_SASL_PORT"]
    sasl_ssl_port: int = PORT_ENV["MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT"]

    def service_dir(self, name: str) -> Path:
        return self.root / name

    def log_file(self, name: str) -> Path:
        return self.service_dir(name) / LOG_FILES[name]

    def pid_file(self, name: str) -> Path:
        return self.service_dir(name) / "pid"

    def launch_file(self, name: str) -> Path:
        return self.service_dir(name) / "launch.json"

    def ports(self, name: str, secure: bool = False) -> list[tuple[int, str]]:
        """(port, env var to change it) pairs a service binds (the broker's secured listeners with `secure`)."""
        if name == KAFKA:
            return [
                (self.kafka_port, "MLFLOW_DATAHUB_KAFKA_PORT"),
                (self.controller_port, "MLFLOW_DATAHUB_CONTROLLER_PORT"),
            ] + ([(self.sasl_port, "MLFLOW_DATAHUB_KAFKA_SASL_PORT"),
                  (self.sasl_ssl_port, "MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT")] if secure else [])
        if name == REGISTRY:
            return [(self.registry_port, "MLFLOW_DATAHUB_REGISTRY_PORT")]
        return [(self.mlflow_port, "MLFLOW_DATAHUB_MLFLOW_PORT")]

    def address(self, name: str) -> str:
        return f"{HOST}:{self.ports(name)[0][0]}"

    def secure_listeners(self) -> dict[str, str]:
        """Security protocol -> host:port of the broker's secured listeners."""
        return {SASL_PLAINTEXT: f"{HOST}:{self.sasl_port}", SASL_SSL: f"{HOST}:{self.sasl_ssl_port}"}

    @property
    def secure_dir(self) -> Path:
        """The secured broker's files: the local CA, the broker's keystore, the dev credentials."""
        return self.service_dir(KAFKA) / "secure"

    @property
    def kafka_home(self) -> Path:
        return self.cache / f"kafka-{KAFKA_VERSION}"

    @property
    def apicurio_home(self) -> Path:
        return self.cache / f"apicurio-registry-{APICURIO_VERSION}"

    @property
    def apicurio_jar(self) -> Path:
        return self.apicurio_home / f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar"


def _port_from_env(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise StackError(f"{var}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise StackError(f"{var}={raw!r} is not a valid port (1-65535)")
    return port


def resolve_layout(root: Path | None) -> Layout:
    ports = {var: _port_from_env(var, default) for var, default in PORT_ENV.items()}
    layout = Layout(
        root=Path(root if root is not None else default_root()).expanduser().resolve(),
        cache=default_cache_dir().resolve(),
        kafka_port=ports["MLFLOW_DATAHUB_KAFKA_PORT"],
        controller_port=ports["MLFLOW_DATAHUB_CONTROLLER_PORT"],
        registry_port=ports["MLFLOW_DATAHUB_REGISTRY_PORT"],
        mlflow_port=ports["MLFLOW_DATAHUB_MLFLOW_PORT"],
        sasl_port=ports["MLFLOW_DATAHUB_KAFKA_SASL_PORT"],
        sasl_ssl_port=ports["MLFLOW_DATAHUB_KAFKA_SASL_SSL_PORT"],
    )
    if len(set(ports.values())) != len(ports):
        raise StackError(f"the stack ports must all differ, got {sorted(ports.items())}")
    return layout


def startup_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    try:
        return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise StackError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None


@contextmanager
def locked(lock_path: Path, progress: Callable[[str], None] | None = None, what: str = "") -> Iterator[None]:
    """An exclusive fcntl lock on lock_path for the duration of the block (not re-entrant)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress(f"waiting for another {what or 'stack command'} to finish ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def root_lock(layout: Layout, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    return locked(layout.root / ".lock", progress, f"stack command on {layout.root}")


# --------------------------------------------------------------------------------------------
# prerequisites


