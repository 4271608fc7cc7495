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

import base64
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
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
JVM_LIGHT = ["-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]

ENV_STACK_DIR = "MLFLOW_DATAHUB_STACK_DIR"
ENV_CACHE_DIR = "MLFLOW_DATAHUB_CACHE_DIR"
ENV_TIMEOUT = "MLFLOW_DATAHUB_STARTUP_TIMEOUT"
PORT_ENV: dict[str, int] = {
    "MLFLOW_DATAHUB_KAFKA_PORT": 19092,
    "MLFLOW_DATAHUB_CONTROLLER_PORT": 19093,
    "MLFLOW_DATAHUB_REGISTRY_PORT": 18081,
    "MLFLOW_DATAHUB_MLFLOW_PORT": 15000,
}
DEFAULT_STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
LOG_FILES = {KAFKA: "kafka.log", REGISTRY: "registry.log", MLFLOW: "mlflow.log"}

# Popen objects of the services this process started, so that they are reaped (no zombies) and
# Python does not warn about them being garbage collected while still running.
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(OperatorError):
    """The stack could not be brought into the requested state; the message says why."""


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap_servers: str
    schema_registry_url: str
    mlflow_tracking_uri: str

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


def _log_progress(message: str) -> None:
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
class _Layout:
    root: Path
    cache: Path
    kafka_port: int
    controller_port: int
    registry_port: int
    mlflow_port: int

    def service_dir(self, name: str) -> Path:
        return self.root / name

    def log_file(self, name: str) -> Path:
        return self.service_dir(name) / LOG_FILES[name]

    def pid_file(self, name: str) -> Path:
        return self.service_dir(name) / "pid"

    def launch_file(self, name: str) -> Path:
        return self.service_dir(name) / "launch.json"

    def ports(self, name: str) -> list[tuple[int, str]]:
        """(port, env var to change it) pairs a service binds."""
        if name == KAFKA:
            return [
                (self.kafka_port, "MLFLOW_DATAHUB_KAFKA_PORT"),
                (self.controller_port, "MLFLOW_DATAHUB_CONTROLLER_PORT"),
            ]
        if name == REGISTRY:
            return [(self.registry_port, "MLFLOW_DATAHUB_REGISTRY_PORT")]
        return [(self.mlflow_port, "MLFLOW_DATAHUB_MLFLOW_PORT")]

    def address(self, name: str) -> str:
        return f"{HOST}:{self.ports(name)[0][0]}"

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


def _layout(root: Path | None) -> _Layout:
    ports = {var: _port_from_env(var, default) for var, default in PORT_ENV.items()}
    layout = _Layout(
        root=Path(root if root is not None else default_root()).expanduser().resolve(),
        cache=default_cache_dir().resolve(),
        kafka_port=ports["MLFLOW_DATAHUB_KAFKA_PORT"],
        controller_port=ports["MLFLOW_DATAHUB_CONTROLLER_PORT"],
        registry_port=ports["MLFLOW_DATAHUB_REGISTRY_PORT"],
        mlflow_port=ports["MLFLOW_DATAHUB_MLFLOW_PORT"],
    )
    if len(set(ports.values())) != len(ports):
        raise StackError(f"the stack ports must all differ, got {sorted(ports.items())}")
    return layout


def _startup_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    try:
        return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise StackError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None


@contextmanager
def _locked(lock_path: Path, progress: Callable[[str], None] | None = None, what: str = "") -> Iterator[None]:
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


def _root_lock(layout: _Layout, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    return _locked(layout.root / ".lock", progress, f"stack command on {layout.root}")


# --------------------------------------------------------------------------------------------
# prerequisites


def _java_major(version: str) -> int | None:
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_292" style
        return int(match.group(2))
    return major


def _check_java() -> str:
    """The absolute path of a Java >= 17 binary, or StackError."""
    message = (
        f"Java {MIN_JAVA} or newer is required for the Kafka broker and the schema registry; "
        "install e.g. openjdk-17-jre-headless"
    )
    java = shutil.which("java")
    if java is None:
        raise StackError(f"{message} (no `java` on PATH)")
    try:
        result = subprocess.run([java, "-version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"{message} (`{java} -version` failed: {exc})") from None
    found = re.search(r'version "([^"]+)"', result.stderr + result.stdout)
    major = _java_major(found.group(1)) if found else None
    if major is None or major < MIN_JAVA:
        seen = found.group(1) if found else "unknown version"
        raise StackError(f"{message} (found {seen} at {java})")
    return str(Path(java).resolve())


def _check_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            f"Maven (`mvn`) is required once to download Kafka {KAFKA_VERSION} and Apicurio Registry "
            f"{APICURIO_VERSION}; install e.g. the `maven` package (or point {ENV_CACHE_DIR} at a "
            "folder that already holds them)"
        )
    return mvn


# --------------------------------------------------------------------------------------------
# installation (into the shared cache)

_KAFKA_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.mlflow-datahub</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def _kafka_installed(layout: _Layout) -> bool:
    libs = layout.kafka_home / "libs"
    return (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file() and (
        libs / f"log4j-slf4j-impl-{LOG4J_VERSION}.jar"
    ).is_file()


def _apicurio_installed(layout: _Layout) -> bool:
    return layout.apicurio_jar.is_file() and (layout.apicurio_home / "lib").is_dir()


def _tail(text_or_path: str | Path, lines: int = 15) -> str:
    if isinstance(text_or_path, Path):
        try:
            with open(text_or_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16384))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return "(no log output)"
    else:
        text = text_or_path
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  | {line}" for line in kept) if kept else "  | (no output)"


def _run_mvn(argv: list[str], cwd: Path, what: str) -> None:
    try:
        result = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise StackError(f"Maven timed out downloading {what}; check access to Maven Central") from None
    if result.returncode != 0:
        raise StackError(
            f"Maven could not download {what} (exit {result.returncode}); check access to Maven Central\n"
            + _tail(result.stdout + "\n" + result.stderr)
        )


def _fresh_tmp(cache: Path, label: str) -> Path:
    """A new temporary folder in the cache, after removing leftovers of interrupted installs."""
    for leftover in cache.glob(f".tmp-{label}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{label}-", dir=cache))


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():  # incomplete or damaged copy from an older layout
        shutil.rmtree(final)
    os.rename(tmp, final)


def _install_kafka(layout: _Layout, progress: Callable[[str], None]) -> None:
    if _kafka_installed(layout):
        return
    mvn = _check_mvn()
    with _locked(layout.cache / ".lock", progress, "install"):
        if _kafka_installed(layout):
            return
        started = time.monotonic()
        progress(f"installing Kafka {KAFKA_VERSION} into {layout.kafka_home} (Maven) ...")
        tmp = _fresh_tmp(layout.cache, "kafka")
        try:
            (tmp / "pom.xml").write_text(_KAFKA_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
            _run_mvn(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(tmp / "pom.xml"),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp / 'libs'}",
                    "-DincludeScope=runtime",
                ],
                cwd=tmp,
                what=f"Kafka {KAFKA_VERSION}",
            )
            jars = list((tmp / "libs").glob("*.jar"))
            if not (tmp / "libs" / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
                raise StackError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {tmp}")
            _publish(tmp, layout.kafka_home)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"installed Kafka {KAFKA_VERSION} ({len(jars)} jars) in {time.monotonic() - started:.0f} s")


def _install_apicurio(layout: _Layout, progress: Callable[[str], None]) -> None:
    if _apicurio_installed(layout):
        return
    mvn = _check_mvn()
    with _locked(layout.cache / ".lock", progress, "install"):
        if _apicurio_installed(layout):
            return
        started = time.monotonic()
        progress(f"installing Apicurio Registry {APICURIO_VERSION} into {layout.apicurio_home} (Maven) ...")
        tmp = _fresh_tmp(layout.cache, "apicurio")
        try:
            download = tmp / "download"
            _run_mvn(
                [
                    mvn,
                    "-q",
                    "-B",
                    "dependency:copy",
                    f"-Dartifact=io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:zip:all",
                    f"-DoutputDirectory={download}",
                ],
                cwd=tmp,
                what=f"Apicurio Registry {APICURIO_VERSION}",
            )
            archive = download / f"apicurio-registry-app-{APICURIO_VERSION}-all.zip"
            if not archive.is_file():
                raise StackError(f"Maven finished but {archive.name} is missing in {download}")
            app = tmp / "app"
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(app)
            runners = list(app.rglob(f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar"))
            if not runners:
                raise StackError(f"{archive.name} has no apicurio-registry-app-{APICURIO_VERSION}-runner.jar")
            _publish(runners[0].parent, layout.apicurio_home)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"installed Apicurio Registry {APICURIO_VERSION} in {time.monotonic() - started:.0f} s")


# --------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


@dataclass(frozen=True)
class _Record:
    pid: int
    argv: list[str]
    address: str


def _read_record(layout: _Layout, name: str) -> _Record | None:
    try:
        pid = int(layout.pid_file(name).read_text().strip())
        launch = json.loads(layout.launch_file(name).read_text())
        return _Record(pid=pid, argv=[str(a) for a in launch["argv"]], address=str(launch["address"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    """True if pid is a live (not zombie) process; reaps it when it is our own child."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(part) for part in raw.split(b"\0")[:-1]] if raw else None


def _running_record(layout: _Layout, name: str) -> _Record | None:
    """The launch record if its process is alive and is still the command we started."""
    record = _read_record(layout, name)
    if record is None or not _alive(record.pid):
        return None
    return record if _cmdline(record.pid) == record.argv else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies: look for a live member.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by pid, wait, then SIGKILL what is left."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (_alive(pid) or _group_alive(pid)):
        time.sleep(0.1)
    if _alive(pid) or _group_alive(pid):
        log.warning("process group %d did not stop within %.0f s; killing it", pid, timeout)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_alive(pid) or _group_alive(pid)):
            time.sleep(0.1)
    _alive(pid)  # reap our own child if it is one


def _remove_record(layout: _Layout, name: str) -> None:
    for path in (layout.pid_file(name), layout.launch_file(name)):
        path.unlink(missing_ok=True)


def _stop_service(layout: _Layout, name: str) -> bool:
    """Stop the service if it is ours and running; clean stale pid files. True if it was stopped."""
    record = _running_record(layout, name)
    if record is None:
        _remove_record(layout, name)
        return False
    log.info("stopping %s (pid %d)", name, record.pid)
    _terminate(record.pid)
    _remove_record(layout, name)
    return True


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _check_ports_free(layout: _Layout, name: str) -> None:
    for port, env_var in layout.ports(name):
        if _port_in_use(port):
            raise StackError(f"port {port} ({name}) is in use by another process; stop it or set {env_var}")


# --------------------------------------------------------------------------------------------
# per-service launch commands

_LOG4J2_PROPERTIES = """\
# Written by connector/stack.py: the broker logs to stdout, which goes to kafka.log.
status = error
name = kafka
appender.out.type = Console
appender.out.name = STDOUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


def _kafka_properties(layout: _Layout, data_dir: Path) -> str:
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{layout.controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{layout.kafka_port},CONTROLLER://{HOST}:{layout.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{layout.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    body = "\n".join(f"{key}={value}" for key, value in lines.items())
    return f"# Written by connector/stack.py on every start; edits are overwritten.\n{body}\n"


def _kafka_cluster_id() -> str:
    """A random Kafka Uuid in its base64url form, as `kafka-storage random-uuid` prints it."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _java_cmd(java: str, layout: _Layout, *args: str) -> list[str]:
    kdir = layout.service_dir(KAFKA)
    return [
        java,
        *JVM_LIGHT,
        f"-Dlog4j2.configurationFile={kdir / 'log4j2.properties'}",
        "-cp",
        f"{layout.kafka_home / 'libs'}/*",
        *args,
    ]


def _prepare_kafka(layout: _Layout, java: str, progress: Callable[[str], None]) -> None:
    """Write the configuration and format the storage once (atomically: format, then rename)."""
    kdir = layout.service_dir(KAFKA)
    data = kdir / "data"
    _write_atomic(kdir / "log4j2.properties", _LOG4J2_PROPERTIES)
    _write_atomic(kdir / "server.properties", _kafka_properties(layout, data))
    if (data / "meta.properties").is_file():
        return
    progress(f"formatting Kafka storage in {data} ...")
    staging = kdir / "data.formatting"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    props = kdir / "format.properties"
    props.write_text(_kafka_properties(layout, staging))
    argv = _java_cmd(
        java,
        layout,
        "kafka.tools.StorageTool",
        "format",
        "-t",
        _kafka_cluster_id(),
        "-c",
        str(props),
        "--standalone",
    )
    with open(layout.log_file(KAFKA), "ab") as out:
        result = subprocess.run(
            argv, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300
        )
    props.unlink(missing_ok=True)
    if result.returncode != 0 or not (staging / "meta.properties").is_file():
        raise StackError(
            f"formatting the Kafka storage failed (exit {result.returncode}); see {layout.log_file(KAFKA)}\n"
            + _tail(layout.log_file(KAFKA))
        )
    os.rename(staging, data)


def _launch(layout: _Layout, name: str, java: str | None, progress: Callable[[str], None]) -> _Launch:
    sdir = layout.service_dir(name)
    env = dict(os.environ)
    if name == KAFKA:
        assert java is not None
        _prepare_kafka(layout, java, progress)
        argv = _java_cmd(java, layout, "kafka.Kafka", str(sdir / "server.properties"))
        return _Launch(argv=argv, cwd=sdir, env=env)
    if name == REGISTRY:
        assert java is not None
        db = sdir / "data" / "registry"
        argv = [
            java,
            *JVM_LIGHT,
            f"-Dquarkus.http.port={layout.registry_port}",
            f"-Dquarkus.http.host={HOST}",
            # Persist schemas (Kafka data persists too, and messages carry schema ids).
            f"-Dquarkus.datasource.jdbc.url=jdbc:h2:file:{db}",
            "-Dquarkus.datasource.jdbc.min-size=1",
            "-Dquarkus.datasource.jdbc.initial-size=1",
            # Confluent Schema Registry's default compatibility rule.
            "-Dregistry.rules.global.compatibility=BACKWARD",
            f"-Dmlflow_datahub.stack={layout.root}",
            "-jar",
            str(layout.apicurio_jar),
        ]
        return _Launch(argv=argv, cwd=sdir, env=env)
    # The job runner (huey consumers, one process per queue) is not needed and is heavy.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mdir = sdir
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{mdir / 'mlflow.db'}",
        "--default-artifact-root",
        str(mdir / "artifacts"),
        "--host",
        HOST,
        "--port",
        str(layout.mlflow_port),
        "--workers",
        "1",
    ]
    return _Launch(argv=argv, cwd=sdir, env=env)


def _start(layout: _Layout, name: str, java: str | None, progress: Callable[[str], None]) -> _Record:
    sdir = layout.service_dir(name)
    sdir.mkdir(parents=True, exist_ok=True)
    launch = _launch(layout, name, java, progress)
    address = layout.address(name)
    with open(layout.log_file(name), "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} on {address} ====\n".encode())
        out.flush()
        proc = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    _write_atomic(layout.launch_file(name), json.dumps({"argv": launch.argv, "address": address}, indent=1))
    _write_atomic(layout.pid_file(name), f"{proc.pid}\n")
    return _Record(pid=proc.pid, argv=launch.argv, address=address)


# --------------------------------------------------------------------------------------------
# readiness probes


def _http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _tcp_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _probe(name: str, address: str) -> None:
    """Return when the service answers its health check, else raise an exception saying why not."""
    if not _tcp_open(address):
        raise ConnectionError(f"nothing listens on {address} yet")
    if name == KAFKA:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": address, "log_level": 0, "socket.timeout.ms": 5000})
        admin.list_topics(timeout=5)
        return
    url = f"http://{address}{CCOMPAT_PATH}/subjects" if name == REGISTRY else f"http://{address}/health"
    code, body = _http_get(url)
    if code != 200:
        raise ConnectionError(f"GET {url} answered HTTP {code}")
    if name == MLFLOW and body.strip() != "OK":
        raise ConnectionError(f"GET {url} answered {body[:80]!r}")


def _wait_ready(layout: _Layout, name: str, record: _Record, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        if not _alive(record.pid):
            _remove_record(layout, name)
            raise StackError(
                f"{name} exited during startup; see {layout.log_file(name)}\n" + _tail(layout.log_file(name))
            )
        try:
            _probe(name, record.address)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    _terminate(record.pid)
    _remove_record(layout, name)
    raise StackError(
        f"{name} did not answer on {record.address} within {timeout:.0f} s ({last_error}); "
        f"see {layout.log_file(name)}\n" + _tail(layout.log_file(name))
    )


# --------------------------------------------------------------------------------------------
# orchestration


def _bring_up(layout: _Layout, names: tuple[str, ...], progress: Callable[[str], None]) -> dict[str, _Record]:
    """Start what is not running among names (in parallel) and wait until all of them answer."""
    layout.root.mkdir(parents=True, exist_ok=True)
    running: dict[str, _Record] = {}
    to_start: list[str] = []
    for name in names:
        record = _running_record(layout, name)
        if record is not None:
            running[name] = record
            if record.address != layout.address(name):
                progress(
                    f"{name} is already running on {record.address}, not on the configured "
                    f"{layout.address(name)}; run `down` first to move it"
                )
        else:
            _remove_record(layout, name)
            to_start.append(name)
    java = _check_java() if any(n in (KAFKA, REGISTRY) for n in to_start) else None
    for name in to_start:
        _check_ports_free(layout, name)
    if KAFKA in to_start:
        _install_kafka(layout, progress)
    if REGISTRY in to_start:
        _install_apicurio(layout, progress)

    timeout = _startup_timeout()
    started: dict[str, _Record] = {}
    try:
        for name in to_start:
            progress(f"starting {name} on {layout.address(name)} ...")
            started[name] = _start(layout, name, java, progress)
        for name in names:
            record = started.get(name) or running[name]
            began = time.monotonic()
            _wait_ready(layout, name, record, timeout)
            if name in started:
                progress(
                    f"{name} running on {record.address} (pid {record.pid}, "
                    f"ready after {time.monotonic() - began:.1f} s)"
                )
            else:
                progress(f"{name} already running on {record.address} (pid {record.pid})")
    except BaseException:
        # Do not leave half a start behind: stop what this call started.
        for name in started:
            _stop_service(layout, name)
        raise
    return {**running, **started}


def up(root: Path | None = None, progress: Callable[[str], None] = _log_progress) -> Endpoints:
    """Install what is missing, start what is not running, wait until everything answers."""
    layout = _layout(root)
    with _root_lock(layout, progress):
        records = _bring_up(layout, SERVICES, progress)
    return Endpoints(
        kafka_bootstrap_servers=records[KAFKA].address,
        schema_registry_url=f"http://{records[REGISTRY].address}{CCOMPAT_PATH}",
        mlflow_tracking_uri=f"http://{records[MLFLOW].address}",
    )


def down(root: Path | None = None) -> list[str]:
    """Stop the services of this root that are running (data stays); names of those stopped."""
    layout = _layout(root)
    if not layout.root.is_dir():
        return []
    stopped: list[str] = []
    with _root_lock(layout):
        for name in reversed(SERVICES):
            if _stop_service(layout, name):
                stopped.append(name)
    return stopped


def status(root: Path | None = None) -> list[ServiceStatus]:
    layout = _layout(root)
    result: list[ServiceStatus] = []
    for name in SERVICES:
        record = _running_record(layout, name)
        result.append(
            ServiceStatus(
                name=name,
                running=record is not None,
                pid=record.pid if record else None,
                address=record.address if record else layout.address(name),
                log_file=layout.log_file(name),
            )
        )
    return result


def _restart_one(root: Path | None, name: str, stop: bool, start: bool) -> None:
    layout = _layout(root)
    with _root_lock(layout):
        if stop and _stop_service(layout, name):
            log.info("%s stopped", name)
        if start:
            _bring_up(layout, (name,), _log_progress)


def kafka_restart(root: Path | None = None) -> None:
    """Stop the broker (SIGTERM, wait) and start it again on the same data; return when it answers."""
    _restart_one(root, KAFKA, stop=True, start=True)


def mlflow_stop(root: Path | None = None) -> None:
    _restart_one(root, MLFLOW, stop=True, start=False)


def mlflow_start(root: Path | None = None) -> None:
    _restart_one(root, MLFLOW, stop=False, start=True)


def registry_stop(root: Path | None = None) -> None:
    _restart_one(root, REGISTRY, stop=True, start=False)


def registry_start(root: Path | None = None) -> None:
    _restart_one(root, REGISTRY, stop=False, start=True)
