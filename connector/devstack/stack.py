"""A real local stack on loopback, without Docker: Kafka (KRaft), a schema registry and MLflow.

`up()` installs what is missing (`installs`), starts what is not running and waits until each
service answers; `down()` stops exactly what `up()` started (`processes`); the folders and ports
come from `layout`. Every start and stop is guarded by a file lock, so concurrent callers do not race.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from connector.devstack import secure as secured
from connector.devstack.installs import check_java, install_apicurio, install_kafka, tail
from connector.devstack.layout import (
    CCOMPAT_PATH,
    HOST,
    JVM_LIGHT,
    KAFKA,
    MLFLOW,
    REGISTRY,
    SERVICES,
    Endpoints,
    Layout,
    SecureListeners,
    ServiceStatus,
    StackError,
    children,
    log_progress,
    resolve_layout,
    root_lock,
    startup_timeout,
)
from connector.devstack.processes import (
    LOG4J2_PROPERTIES,
    Launch,
    Record,
    alive,
    check_ports_free,
    remove_record,
    running_record,
    stop_service,
    terminate,
    write_atomic,
)

log = logging.getLogger("connector.stack")


def _kafka_properties(layout: Layout, data_dir: Path, secure: tuple[dict[str, str], dict[str, str]] | None = None
                      ) -> str:
    """The broker's properties; `secure` = (secured listeners, their properties) adds SASL_PLAINTEXT and
    SASL_SSL listeners (see connector/devstack/secure.py); the PLAINTEXT listener stays as it is."""
    listeners, secure_properties = secure or ({}, {})
    extra = "".join(f",{protocol}://{address}" for protocol, address in listeners.items())
    mapping = "".join(f",{protocol}:{protocol}" for protocol in listeners)
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{layout.controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{layout.kafka_port},CONTROLLER://{HOST}:{layout.controller_port}{extra}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{layout.kafka_port}{extra}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": f"PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{mapping}",
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
        **secure_properties,
    }
    body = "\n".join(f"{key}={value}" for key, value in lines.items())
    return f"# Written by connector/stack.py on every start; edits are overwritten.\n{body}\n"


def _kafka_cluster_id() -> str:
    """A random Kafka Uuid in its base64url form, as `kafka-storage random-uuid` prints it."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _java_cmd(java: str, layout: Layout, *args: str) -> list[str]:
    kdir = layout.service_dir(KAFKA)
    return [
        java,
        *JVM_LIGHT,
        f"-Dlog4j2.configurationFile={kdir / 'log4j2.properties'}",
        "-cp",
        f"{layout.kafka_home / 'libs'}/*",
        *args,
    ]


def _prepare_kafka(layout: Layout, java: str, progress: Callable[[str], None], secure: bool) -> dict[str, str]:
    """Write the configuration and format the storage once (atomically: format, then rename). Returns
    the secured listeners (protocol -> host:port) the broker will have, none unless `secure`."""
    kdir = layout.service_dir(KAFKA)
    data = kdir / "data"
    secure_setup = secured.prepare(layout, java, progress) if secure else None
    write_atomic(kdir / "log4j2.properties", LOG4J2_PROPERTIES)
    properties = _kafka_properties(layout, data, secure_setup)
    # The secured broker's properties hold the keystore and PLAIN passwords (dev credentials, still).
    write_atomic(kdir / "server.properties", properties, 0o600)
    listeners = secure_setup[0] if secure_setup else {}
    if (data / "meta.properties").is_file():
        return listeners
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
            + tail(layout.log_file(KAFKA))
        )
    os.rename(staging, data)
    return listeners


def _launch(layout: Layout, name: str, java: str | None, progress: Callable[[str], None],
            secure: bool = False) -> tuple[Launch, dict[str, str]]:
    """The command line of a service (and, for the broker, its secured listeners)."""
    sdir = layout.service_dir(name)
    env = dict(os.environ)
    if name == KAFKA:
        assert java is not None
        listeners = _prepare_kafka(layout, java, progress, secure)
        argv = _java_cmd(java, layout, "kafka.Kafka", str(sdir / "server.properties"))
        return Launch(argv=argv, cwd=sdir, env=env), listeners
    if name == REGISTRY:
        assert java is not None
        db = sdir / "data" / "registry"
        argv = [
            java,
            *JVM_LIGHT,
            f"-Dquarkus.http.port={layout.registry_port}",
            f"-Dquarkus.http.host={HOST}",
            # Persist schemas (Kafka data persists too, and messages carry schema ids), each as it is
            # registered (WRITE_DELAY=0: H2 otherwise writes commits up to 0.5 s later, and a registry
            # killed meanwhile, as a stop that times out does, would lose them).
            f"-Dquarkus.datasource.jdbc.url=jdbc:h2:file:{db};WRITE_DELAY=0",
            "-Dquarkus.datasource.jdbc.min-size=1",
            "-Dquarkus.datasource.jdbc.initial-size=1",
            # Confluent Schema Registry's default compatibility rule.
            "-Dregistry.rules.global.compatibility=BACKWARD",
            f"-Dmlflow_datahub.stack={layout.root}",
            "-jar",
            str(layout.apicurio_jar),
        ]
        return Launch(argv=argv, cwd=sdir, env=env), {}
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
    return Launch(argv=argv, cwd=sdir, env=env), {}


def _start(layout: Layout, name: str, java: str | None, progress: Callable[[str], None],
           secure: bool = False) -> Record:
    sdir = layout.service_dir(name)
    sdir.mkdir(parents=True, exist_ok=True)
    launch, listeners = _launch(layout, name, java, progress, secure)
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
    children[proc.pid] = proc
    launched = {"argv": launch.argv, "address": address, **({"listeners": listeners} if listeners else {})}
    write_atomic(layout.launch_file(name), json.dumps(launched, indent=1))
    write_atomic(layout.pid_file(name), f"{proc.pid}\n")
    return Record(pid=proc.pid, argv=launch.argv, address=address, listeners=listeners)


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
        from connector.kafka.clients import broker_probe

        broker_probe(address).list_topics(timeout=5)
        return
    url = f"http://{address}{CCOMPAT_PATH}/subjects" if name == REGISTRY else f"http://{address}/health"
    code, body = _http_get(url)
    if code != 200:
        raise ConnectionError(f"GET {url} answered HTTP {code}")
    if name == MLFLOW and body.strip() != "OK":
        raise ConnectionError(f"GET {url} answered {body[:80]!r}")


def _wait_ready(layout: Layout, name: str, record: Record, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        if not alive(record.pid):
            remove_record(layout, name)
            raise StackError(
                f"{name} exited during startup; see {layout.log_file(name)}\n" + tail(layout.log_file(name))
            )
        try:
            _probe(name, record.address)
            if record.secure:  # the SCRAM user, then both secured listeners answering
                secured.after_start(layout, record.address, record.listeners, deadline)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    terminate(record.pid)
    remove_record(layout, name)
    raise StackError(
        f"{name} did not answer on {record.address} within {timeout:.0f} s ({last_error}); "
        f"see {layout.log_file(name)}\n" + tail(layout.log_file(name))
    )


# --------------------------------------------------------------------------------------------
# orchestration


def _restart_secured(layout: Layout, record: Record, progress: Callable[[str], None], why: str) -> None:
    """Stop the running broker so that it starts again with its secured listeners (ports checked first)."""
    if not record.secure:  # the ports it will add, checked before the broker goes down
        check_ports_free(layout, KAFKA, secure=True, only_secure=True)
    progress(f"restarting {KAFKA} ({why}) ...")
    stop_service(layout, KAFKA)


def _bring_up(layout: Layout, names: tuple[str, ...], progress: Callable[[str], None],
              secure: bool = False) -> dict[str, Record]:
    """Start what is not running among names (in parallel) and wait until all of them answer.

    `secure` gives the broker its secured listeners (a running broker without them is restarted on the
    same data); without it a broker is started without them, but a running one is kept as it is."""
    layout.root.mkdir(parents=True, exist_ok=True)
    running: dict[str, Record] = {}
    to_start: list[str] = []
    for name in names:
        record = running_record(layout, name)
        if record is not None and name == KAFKA and record.secure and not secured.client_properties(layout).is_file():
            secure = True  # its dev credentials are gone: new ones need a restart (PLAIN users are in its properties)
            record = _restart_secured(layout, record, progress, "its dev credentials file is missing")
        if record is not None and name == KAFKA and secure and not record.secure:
            record = _restart_secured(layout, record, progress, "with its secured listeners (SASL_PLAINTEXT, SASL_SSL)")
        if record is not None:
            running[name] = record
            if record.address != layout.address(name):
                progress(
                    f"{name} is already running on {record.address}, not on the configured "
                    f"{layout.address(name)}; run `down` first to move it"
                )
        else:
            remove_record(layout, name)
            to_start.append(name)
    java = check_java() if any(n in (KAFKA, REGISTRY) for n in to_start) else None
    for name in to_start:
        check_ports_free(layout, name, secure and name == KAFKA)
    if KAFKA in to_start:
        install_kafka(layout, progress)
    if REGISTRY in to_start:
        install_apicurio(layout, progress)

    timeout = startup_timeout()
    started: dict[str, Record] = {}
    try:
        for name in to_start:
            progress(f"starting {name} on {layout.address(name)} ...")
            started[name] = _start(layout, name, java, progress, secure and name == KAFKA)
        for name in names:
            record = started.get(name) or running[name]
            began = time.monotonic()
            _wait_ready(layout, name, record, timeout)
            secured_too = "".join(f", {p} on {a}" for p, a in record.listeners.items())
            if name in started:
                progress(
                    f"{name} running on {record.address}{secured_too} (pid {record.pid}, "
                    f"ready after {time.monotonic() - began:.1f} s)"
                )
            else:
                progress(f"{name} already running on {record.address}{secured_too} (pid {record.pid})")
    except BaseException:
        # Do not leave half a start behind: stop what this call started.
        for name in started:
            stop_service(layout, name)
        raise
    return {**running, **started}


def up(root: Path | None = None, progress: Callable[[str], None] = log_progress, secure: bool = False
       ) -> Endpoints:
    """Install what is missing, start what is not running, wait until everything answers. With
    `secure` the broker also has its SASL_PLAINTEXT and SASL_SSL listeners (`Endpoints.secure`)."""
    layout = resolve_layout(root)
    with root_lock(layout, progress):
        records = _bring_up(layout, SERVICES, progress, secure)
    return Endpoints(
        kafka_bootstrap_servers=records[KAFKA].address,
        schema_registry_url=f"http://{records[REGISTRY].address}{CCOMPAT_PATH}",
        mlflow_tracking_uri=f"http://{records[MLFLOW].address}",
        secure=_secure_listeners(layout, records[KAFKA]),
    )


def kafka_up(root: Path | None = None, progress: Callable[[str], None] = log_progress, secure: bool = False
             ) -> tuple[str, SecureListeners | None]:
    """The broker alone (tests that need no registry or MLflow of the stack's): its PLAINTEXT address
    and, with `secure`, its secured listeners."""
    layout = resolve_layout(root)
    with root_lock(layout, progress):
        record = _bring_up(layout, (KAFKA,), progress, secure)[KAFKA]
    return record.address, _secure_listeners(layout, record)


def _secure_listeners(layout: Layout, record: Record | None) -> SecureListeners | None:
    return secured.listeners_of(layout, record.listeners) if record is not None and record.secure else None


def down(root: Path | None = None) -> list[str]:
    """Stop the services of this root that are running (data stays); names of those stopped."""
    layout = resolve_layout(root)
    if not layout.root.is_dir():
        return []
    stopped: list[str] = []
    with root_lock(layout):
        for name in reversed(SERVICES):
            if stop_service(layout, name):
                stopped.append(name)
    return stopped


def status(root: Path | None = None) -> list[ServiceStatus]:
    layout = resolve_layout(root)
    result: list[ServiceStatus] = []
    for name in SERVICES:
        record = running_record(layout, name)
        result.append(
            ServiceStatus(
                name=name,
                running=record is not None,
                pid=record.pid if record else None,
                address=record.address if record else layout.address(name),
                log_file=layout.log_file(name),
                secure=_secure_listeners(layout, record),
            )
        )
    return result


def _restart_one(root: Path | None, name: str, stop: bool, start: bool) -> None:
    layout = resolve_layout(root)
    with root_lock(layout):
        record = running_record(layout, name)
        secure = record is not None and record.secure  # a restarted broker keeps its secured listeners
        if stop and stop_service(layout, name):
            log.info("%s stopped", name)
        if start:
            _bring_up(layout, (name,), log_progress, secure)


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
