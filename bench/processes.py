"""The bench's child processes: a command run and watched (wall time, CPU time, peak resident memory
of it and the processes it starts), the CPU time of a process tree read from /proc, and the
connector's log lines read back for when things happened."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.scale_fixture import REPO


@dataclass
class Finished:
    rc: int
    wall: float
    maxrss_mb: float
    cpu_seconds: float
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _process_tree(pid: int) -> list[int]:
    """A process and every process under it (those still there)."""
    tree, pending = [], [pid]
    while pending:
        p = pending.pop()
        tree.append(p)
        pending += _children(p)
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and every process under it."""
    return sum(_cpu_seconds(p) for p in _process_tree(pid))


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Child:
    """A subprocess: its end is reaped with wait4 (for its CPU time, its own processes' included) and
    its peak resident memory is VmHWM from /proc/<pid>/status, sampled every 50 ms while it runs, for
    it and each process it starts (`snapshot` forks its consumers): the figure is the sum of their
    peaks. (wait4's ru_maxrss cannot be used: Linux carries the parent's RSS at fork over into the
    child's.) Each process's CPU time is sampled with it (`cpu`)."""

    def __init__(self, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self._out = open(logs.with_suffix(".out"), "w+")
        self._err = open(logs.with_suffix(".err"), "w+")
        self.started = time.time()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self._out, stderr=self._err, cwd=REPO,
                                     env=env or {**os.environ})
        self.finished: Finished | None = None
        self.peaks: dict[int, float] = {}  # pid -> VmHWM, MB, for the process and its descendants
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sample (up to 50 ms short at its end)
        self._sampler = threading.Thread(target=self._sample, name="vmhwm", daemon=True)
        self._sampler.start()

    @property
    def peak_mb(self) -> float:
        return sum(self.peaks.values())

    def _sample_tree(self) -> None:
        for pid in _process_tree(self.proc.pid):
            hwm = _vm_hwm_mb(pid)
            if hwm is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)
            cpu = _cpu_seconds(pid)
            if cpu:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu)

    def _sample(self) -> None:
        while self.finished is None:
            self._sample_tree()
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.logs.with_suffix(".err").read_text(errors="replace")

    def alive(self) -> bool:
        return self.finished is None and self._reap(block=False) is None

    def vm_hwm_mb(self) -> float | None:
        return _vm_hwm_mb(self.proc.pid)

    def _reap(self, block: bool) -> Finished | None:
        if self.finished is not None:
            return self.finished
        self._sample_tree()  # the last reading while it is still there (a zombie has none)
        pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        wall = time.monotonic() - self._t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._out.close()
        self._err.close()
        self.finished = Finished(
            rc=self.proc.returncode, wall=wall, maxrss_mb=self.peak_mb,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            stdout=self.logs.with_suffix(".out").read_text(errors="replace"), stderr=self.stderr(),
        )
        return self.finished

    def wait(self, timeout: float) -> Finished:
        deadline = time.monotonic() + timeout
        while True:
            done = self._reap(block=False)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                self.proc.kill()
                done = self._reap(block=True)
                assert done is not None
                raise TimeoutError(f"{self.proc.args[:4]} still running after {timeout:.0f} s; killed "
                                   f"(logs: {self.logs}.*)")
            time.sleep(0.01)

    def stop(self, timeout: float = 60) -> Finished:
        if self.finished is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def connector_cli(*args: str | Path) -> list[str | Path]:
    """The connector's command; BENCH_CONNECTOR_DIR: the `connector` package of another tree (to time a
    version before a change against the one after it, in the same run)."""
    other = os.environ.get("BENCH_CONNECTOR_DIR")
    if other:
        return [sys.executable, "-c", f"import runpy, sys; sys.path.insert(0, {other!r}); "
                "sys.argv[0] = 'mlflow-datahub'; runpy.run_module('connector.cli', run_name='__main__')", *args]
    return [sys.executable, "-m", "connector.cli", *args]


LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) ")


def log_time(text: str, pattern: str) -> float | None:
    """Epoch seconds of the first log line (the CLI's asctime format) matching `pattern`."""
    rx = re.compile(pattern)
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and rx.search(line):
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    return None


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])
