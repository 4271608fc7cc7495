"""Real MLflow servers on loopback, each with its own SQLite store: the launcher that the tests and the
bench share. `python` chooses the MLflow: the connector's own (3.x, started with uvicorn as 3.x does)
or another version's virtualenv (`mlflow2_python()`: MLflow 2.x, started with gunicorn as 2.x does)."""

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
                 workers: int = 1, python: str | Path | None = None, app_name: str | None = None) -> None:
        self.workdir = workdir
        self.env = dict(env or {})  # extra environment of the server process
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = workdir / "mlflow.db"
        if template_db is not None and template_db.exists() and not self.db.exists():
            shutil.copy(template_db, self.db)
        self.workers = workers
        self.python = str(python or sys.executable)
        self.app_name = app_name  # e.g. "basic-auth": MLflow's authentication app
        self.log_path = workdir / "server.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        with open(self.log_path, "ab") as log:  # the server keeps its own descriptor
            self.process = subprocess.Popen(
                [self.python, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--default-artifact-root", str(self.workdir / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers),
                 *(["--app-name", self.app_name] if self.app_name else [])],
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

    @property
    def version(self) -> str:
        """The MLflow version this server runs."""
        return subprocess.run([self.python, "-c", "import mlflow; print(mlflow.__version__)"], check=True,
                              capture_output=True, text=True).stdout.strip()

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


MLFLOW2_VENV_ENV = "MLFLOW_DATAHUB_MLFLOW2_VENV"


class MlflowVersionMissing(Exception):
    """The virtualenv of another MLflow version is not installed."""


def mlflow2_python() -> Path:
    """The Python of the MLflow 2.x virtualenv (`make test` creates it in .cache/mlflow2-venv;
    MLFLOW_DATAHUB_MLFLOW2_VENV overrides the location)."""
    venv = Path(os.environ.get(MLFLOW2_VENV_ENV) or Path(__file__).resolve().parents[2] / ".cache" / "mlflow2-venv")
    python = venv / "bin" / "python"
    if not python.exists():
        raise MlflowVersionMissing(f"MLflow 2.x is not installed: {python} does not exist. Run the tests with "
                                   "`make test` (it creates the virtualenv), or: make .cache/mlflow2-venv/.installed")
    return python


def run_with(python: str | Path, function: str, *args: str, timeout: float = 300) -> str:
    """`connector.devstack.<module>.<function>(*args)` run by another MLflow's Python (its own client,
    for content a 2.x server must receive from a 2.x client); returns what it printed."""
    module, _, name = function.rpartition(".")
    code = f"import sys; from {module} import {name}; print({name}(*sys.argv[1:]))"
    result = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if result.returncode != 0:
        raise RuntimeError(f"{function} with {python} failed:\n{result.stderr[-3000:]}")
    return result.stdout
