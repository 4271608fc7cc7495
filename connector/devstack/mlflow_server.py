"""Real MLflow servers for tests: `mlflow server` on loopback with its own SQLite store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process; stop() and start() again keep its store (for outage tests)."""

    def __init__(self, workdir: Path, template_db: Path | None = None, env: dict[str, str] | None = None,
                 workers: int = 1) -> None:
        self.workdir = workdir
        self.env = dict(env or {})  # extra environment of the server process
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = workdir / "mlflow.db"
        if template_db is not None and template_db.exists() and not self.db.exists():
            shutil.copy(template_db, self.db)
        self.workers = workers
        self.log_path = workdir / "server.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        with open(self.log_path, "ab") as log:  # the server keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--default-artifact-root", str(self.workdir / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} not up in {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)
        self.process = None
