"""A schema registry that requires basic auth: an authenticating loopback front (as a reverse proxy with
basic auth, or Confluent Cloud, stands before a registry) to the real registry. With
`kafka.schema_registry_config` (`basic.auth.user.info`) the connector registers and reads the MCP
schema through it; with wrong credentials a command stops with one line, without the password."""

from __future__ import annotations

import base64
import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from connector.devstack.mlflow_server import MlflowServer, free_port
from tests.conftest import ConfigFactory, Kafka, run_cli

USER, PASSWORD = "registry-user", "Regi5try-Pa55"


class AuthFront(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.upstream = upstream.rstrip("/")
        self.expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AuthFront

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if self.headers.get("Authorization") != self.server.expected:
            self.server.refused += 1
            payload = b'{"error_code": 401, "message": "Unauthorized"}'
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="registry"')
        else:
            request = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type") or
                                                      "application/vnd.schemaregistry.v1+json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    payload, status = response.read(), response.status
            except urllib.error.HTTPError as e:
                payload, status = e.read(), e.code
            self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


@pytest.fixture(scope="module")
def front(kafka: Kafka) -> Iterator[AuthFront]:
    server = AuthFront(kafka.registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _config(make_config: ConfigFactory, mlflow: MlflowServer, front: AuthFront, user_info: str) -> Any:
    path, _ = make_config(mlflow.uri, {"kafka": {"schema_registry_url": front.url, "schema_registry_config": {
        "basic.auth.user.info": user_info}}})
    return path


def test_snapshot_and_dump_through_a_registry_that_requires_basic_auth(
        demo_mlflow: MlflowServer, make_config: ConfigFactory, front: AuthFront, tmp_path: Any) -> None:
    path = _config(make_config, demo_mlflow, front, f"{USER}:{PASSWORD}")
    result = run_cli("snapshot", "-c", str(path))
    assert result.returncode == 0 and "complete" in result.stdout, result.stdout + result.stderr[-3000:]
    dumped = run_cli("dump", "-c", str(path), "--out", str(tmp_path / "mcps.json"))
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr + dumped.stdout + dumped.stderr


def test_wrong_registry_credentials_stop_with_one_line(demo_mlflow: MlflowServer, make_config: ConfigFactory,
                                                       front: AuthFront) -> None:
    path = _config(make_config, demo_mlflow, front, f"{USER}:wrong-Pa55word")
    # `snapshot` publishes its events (the change topic needs no registry), then its consumer is refused;
    # `consume` then meets the same refusal on those events.
    for command in ("snapshot", "consume"):
        result = run_cli(command, "-c", str(path), timeout=120)
        output = result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
        assert "schema registry" in last and "refused the credentials (HTTP 401" in last, last
        assert "wrong-Pa55word" not in output and PASSWORD not in output
    assert front.refused > 0
