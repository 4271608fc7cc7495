"""The local stack's processes: launch records, liveness by pid and command line, signals, ports."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from connector.devstack.layout import HOST, STOP_TIMEOUT_S, Layout, StackError, children

log = logging.getLogger("connector.stack")


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


@dataclass(frozen=True)
class Record:
    pid: int
    argv: list[str]
    address: str
    # The broker's secured listeners it was started with (security protocol -> host:port); empty if none.
    listeners: dict[str, str] = field(default_factory=dict)

    @property
    def secure(self) -> bool:
        return bool(self.listeners)


def _read_record(layout: Layout, name: str) -> Record | None:
    try:
        pid = int(layout.pid_file(name).read_text().strip())
        launch = json.loads(layout.launch_file(name).read_text())
        listeners = {str(k): str(v) for k, v in (launch.get("listeners") or {}).items()}
        return Record(pid=pid, argv=[str(a) for a in launch["argv"]], address=str(launch["address"]),
                      listeners=listeners)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file by renaming a complete temporary one over it (`mode`: 0o600 for one that holds secrets)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def alive(pid: int) -> bool:
    """True if pid is a live (not zombie) process; reaps it when it is our own child."""
    child = children.get(pid)
    if child is not None and child.poll() is not None:
        del children[pid]
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


def running_record(layout: Layout, name: str) -> Record | None:
    """The launch record if its process is alive and is still the command we started."""
    record = _read_record(layout, name)
    if record is None or not alive(record.pid):
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


def terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by pid, wait, then SIGKILL what is left."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (alive(pid) or _group_alive(pid)):
        time.sleep(0.1)
    if alive(pid) or _group_alive(pid):
        log.warning("process group %d did not stop within %.0f s; killing it", pid, timeout)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (alive(pid) or _group_alive(pid)):
            time.sleep(0.1)
    alive(pid)  # reap our own child if it is one


def remove_record(layout: Layout, name: str) -> None:
    for path in (layout.pid_file(name), layout.launch_file(name)):
        path.unlink(missing_ok=True)


def stop_service(layout: Layout, name: str) -> bool:
    """Stop the service if it is ours and running; clean stale pid files. True if it was stopped."""
    record = running_record(layout, name)
    if record is None:
        remove_record(layout, name)
        return False
    log.info("stopping %s (pid %d)", name, record.pid)
    terminate(record.pid)
    remove_record(layout, name)
    return True


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def check_ports_free(layout: Layout, name: str, secure: bool = False, only_secure: bool = False) -> None:
    """StackError naming the env var to change if a port the service would bind is taken (`only_secure`:
    just the broker's secured listeners, which a running broker without them does not hold)."""
    ports = layout.ports(name, secure)
    if only_secure:
        ports = [p for p in ports if p not in layout.ports(name)]
    for port, env_var in ports:
        if _port_in_use(port):
            raise StackError(f"port {port} ({name}) is in use by another process; stop it or set {env_var}")


# --------------------------------------------------------------------------------------------
# per-service launch commands

LOG4J2_PROPERTIES = """\
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


