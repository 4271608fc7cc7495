"""The operations endpoint (`metrics.listen`): `/metrics` for Prometheus, `/livez` and `/readyz` for
Kubernetes' probes (Kafka Connect's KIP-1017 `/health` and Kubernetes' own conventions).

- `/livez`: 200 while every loop of the process makes progress (each beats its `Heartbeats` entry,
  also while it waits on a retried outage); 503 naming the loop that has not beaten for
  `stall_seconds` (stuck: a restart may help).
- `/readyz`: 200 when MLflow, Kafka and the schema registry answer (checked every few seconds in a
  thread of its own); 503 naming what does not answer. The process keeps running and retrying: an
  outage is not a reason to restart it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connector.errors import first_line
from connector.observability.metrics import METRICS

log = logging.getLogger("connector.operations")


class Heartbeats:
    """When each loop of the process last made progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        with self._lock:
            self._last[loop] = self.clock()

    def forget(self, loop: str) -> None:
        with self._lock:
            self._last.pop(loop, None)

    def stuck(self, stall_seconds: float) -> dict[str, float]:
        """Loops without progress for more than `stall_seconds`, with how long."""
        now = self.clock()
        with self._lock:
            return {loop: now - last for loop, last in self._last.items() if now - last > stall_seconds}


HEARTBEATS = Heartbeats()


class Readiness:
    """Checks each dependency every `interval` seconds in a thread of its own; a check raises when its
    dependency does not answer."""

    def __init__(self, checks: dict[str, Callable[[], None]], interval: float = 10.0) -> None:
        self.checks = checks
        self.interval = interval
        self.failures: dict[str, str] = {name: "not checked yet" for name in checks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> Readiness:
        self._thread.start()
        return self

    def check_once(self) -> None:
        for name, check in self.checks.items():
            try:
                check()
            except Exception as e:  # any failure means: not ready; said once when it starts and ends
                if name not in self.failures or self.failures[name] == "not checked yet":
                    log.warning("not ready: %s does not answer (%s)", name, first_line(e, 200))
                self.failures[name] = first_line(e, 200)
            else:
                if name in self.failures and self.failures[name] != "not checked yet":
                    log.info("%s answers again", name)
                self.failures.pop(name, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


class OperationsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], heartbeats: Heartbeats, readiness: Readiness | None,
                 stall_seconds: float) -> None:
        super().__init__(address, _Handler)
        self.heartbeats = heartbeats
        self.readiness = readiness
        self.stall_seconds = stall_seconds

    def start(self) -> OperationsServer:
        threading.Thread(target=self.serve_forever, name="operations-http", daemon=True).start()
        host, port = self.server_address[:2]
        log.info("metrics and health on http://%s:%d (/metrics, /livez, /readyz)", host, port)
        return self

    def stop(self) -> None:
        if self.readiness is not None:
            self.readiness.stop()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OperationsServer

    def log_message(self, *args: object) -> None:  # scrapes and probes every few seconds: not logged
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict[str, object]) -> None:
        self._answer(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(METRICS.registry), CONTENT_TYPE_LATEST)
        elif path == "/livez":
            stuck = self.server.heartbeats.stuck(self.server.stall_seconds)
            self._json(503 if stuck else 200, {"live": not stuck,
                                               "stuck": {k: round(v, 1) for k, v in stuck.items()}})
        elif path == "/readyz":
            failures = dict(self.server.readiness.failures) if self.server.readiness else {}
            self._json(503 if failures else 200, {"ready": not failures, "not_answering": failures})
        else:
            self._json(404, {"error": "not found: /metrics, /livez, /readyz"})
