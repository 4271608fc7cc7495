"""MLflow webhooks: the receiver over real HTTP (authentication, freshness, replays, limits), and end to
end: a real MLflow 3.17 server delivers webhooks to `mlflow-datahub run`, whose targeted reads put
registry changes that move no timestamp (a version tag, an alias) on the MCP topic long before the
next poll."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from datahub.metadata.schema_classes import MLModelPropertiesClass, VersionPropertiesClass
from mlflow import MlflowClient

from connector import cli
from connector.config import ConfigError, parse
from connector.datahub.mapping import MappingSettings, model_urn
from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.mlflow.webhooks import EVENTS, PATH, WebhookReceiver
from connector.pipeline.dump import as_wrapper, read_mcps
from tests.conftest import REPO, ConfigFactory, run_cli

SECRET = "whsec-test-3f9c"
LOGGER = "connector.webhooks"
# What an MLflow server needs to deliver to an http:// URL on loopback (SSRF protection is on by default).
LOOPBACK_DELIVERY = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}


def _sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's scheme, written out independently of the code under test."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _body(entity: str = "model_version_tag", action: str = "set", name: str = "churn model") -> bytes:
    # The shape MLflow 3.17 sends (mlflow/webhooks/delivery.py), compact JSON as json.dumps writes it.
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-27T10:00:00+00:00",
                       "data": {"name": name, "version": "3", "key": "k", "value": "v"}}).encode()


def _headers(body: bytes, *, secret: str = SECRET, delivery_id: str | None = None,
             timestamp: int | None = None) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": _sign(secret, delivery_id, ts, body)}


def _send(url: str, body: bytes | None, headers: dict[str, str], method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def receiver() -> Iterator[tuple[WebhookReceiver, queue.Queue[str]]]:
    requests: queue.Queue[str] = queue.Queue()
    server = WebhookReceiver("127.0.0.1", 0, SECRET, 300, requests).start()
    yield server, requests
    server.stop()


def _queued(requests: queue.Queue[str]) -> list[str]:
    out = []
    while not requests.empty():
        out.append(requests.get_nowait())
    return out


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- the receiver over real HTTP --------------------------------------------------------------------


def test_authentic_delivery_queues_the_model(receiver, caplog: pytest.LogCaptureFixture) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    body = _body(name="churn model")
    headers = _headers(body, delivery_id="d-accept-1")
    status, _ = _send(server.url, body, headers)
    assert status == 202
    assert _queued(requests) == ["churn model"]
    accepted = _messages(caplog, logging.INFO)
    assert any("accepted" in m and "model_version_tag.set" in m and "d-accept-1" in m for m in accepted), accepted
    # every followed event names its registered model in data.name
    for event in EVENTS:
        entity, action = event.split(".")
        body = _body(entity, action, name=f"model of {event}")
        assert _send(server.url, body, _headers(body))[0] == 202
    assert _queued(requests) == [f"model of {event}" for event in EVENTS]


def _bad_signature(body: bytes) -> dict[str, str]:
    return _headers(body, secret="not-the-secret")


def _unsigned(body: bytes) -> dict[str, str]:
    return {k: v for k, v in _headers(body).items() if k != "X-MLflow-Signature"}


def _no_delivery_id(body: bytes) -> dict[str, str]:
    return {k: v for k, v in _headers(body).items() if k != "X-MLflow-Delivery-Id"}


def _no_timestamp(body: bytes) -> dict[str, str]:
    return {k: v for k, v in _headers(body).items() if k != "X-MLflow-Timestamp"}


def _tampered(body: bytes) -> dict[str, str]:
    return _headers(body.replace(b"churn model", b"other model"))  # signed for another body


def _other_version(body: bytes) -> dict[str, str]:
    headers = _headers(body)
    headers["X-MLflow-Signature"] = headers["X-MLflow-Signature"].replace("v1,", "v2,")
    return headers


def _stale(body: bytes) -> dict[str, str]:
    return _headers(body, timestamp=int(time.time()) - 301)


def _future(body: bytes) -> dict[str, str]:
    return _headers(body, timestamp=int(time.time()) + 301)


@pytest.mark.parametrize(("make_headers", "status", "reason"), [
    (_bad_signature, 401, "signature does not match"),
    (_unsigned, 401, "no X-MLflow-Signature header"),
    (_no_delivery_id, 400, "no X-MLflow-Delivery-Id header"),
    (_no_timestamp, 400, "no X-MLflow-Timestamp header"),
    (_tampered, 401, "signature does not match"),
    (_other_version, 401, "signature does not match"),
    (_stale, 400, "in the past"),
    (_future, 400, "in the future"),
])
def test_unauthentic_or_stale_requests_are_refused(receiver, caplog: pytest.LogCaptureFixture,
                                                   make_headers: Callable[[bytes], dict[str, str]], status: int,
                                                   reason: str) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    body = _body()
    headers = make_headers(body)
    assert _send(server.url, body, headers)[0] == status
    assert _queued(requests) == []
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and reason in warnings[0] and f"({status})" in warnings[0], warnings
    if "X-MLflow-Delivery-Id" in headers:
        assert headers["X-MLflow-Delivery-Id"] in warnings[0]
    assert not _messages(caplog, logging.INFO)
    assert SECRET not in caplog.text


def test_replayed_delivery_is_refused(receiver, caplog: pytest.LogCaptureFixture) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    body = _body()
    headers = _headers(body, delivery_id="d-replayed")
    assert _send(server.url, body, headers)[0] == 202
    assert _send(server.url, body, headers)[0] == 409
    # a fresh timestamp does not make an accepted delivery id new again (the signature covers both)
    assert _send(server.url, body, _headers(body, delivery_id="d-replayed"))[0] == 409
    assert _queued(requests) == ["churn model"]
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 2 and all("replay" in w and "d-replayed" in w for w in warnings), warnings


def test_wrong_path_method_and_malformed_body(receiver, caplog: pytest.LogCaptureFixture) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    body = _body()
    base = f"http://127.0.0.1:{server.port}"
    assert _send(base + "/webhooks/other", body, _headers(body))[0] == 404
    assert _send(base + "/", None, {}, method="GET")[0] == 404
    assert _send(base + PATH, None, {}, method="GET")[0] == 405
    assert _send(base + PATH, body, _headers(body), method="PUT")[0] == 405
    not_json = b"{not json"
    assert _send(base + PATH, not_json, _headers(not_json))[0] == 400
    nameless = json.dumps({"entity": "model_version", "action": "created", "data": {"version": "1"}}).encode()
    assert _send(base + PATH, nameless, _headers(nameless))[0] == 400
    assert _queued(requests) == []
    warnings = _messages(caplog, logging.WARNING)
    assert [w.split(")")[0] for w in warnings] == [
        "webhook rejected (404", "webhook rejected (404", "webhook rejected (405", "webhook rejected (405",
        "webhook rejected (400", "webhook rejected (400"], warnings
    assert "body is not JSON" in warnings[4] and "without data.name" in warnings[5]


def test_oversized_body_is_refused_unread(receiver, caplog: pytest.LogCaptureFixture) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", PATH)
    connection.putheader("Content-Length", str(2 * 1024 * 1024))
    for name, value in _headers(b"x").items():
        connection.putheader(name, value)
    connection.endheaders()  # the body never comes: the answer must not wait for it
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    assert _queued(requests) == []
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "(413)" in warnings[0], warnings


def test_authentic_event_the_connector_does_not_follow_is_acknowledged(receiver,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    server, requests = receiver
    caplog.set_level(logging.INFO, LOGGER)
    body = _body("prompt", "created", name="a prompt")
    status, _ = _send(server.url, body, _headers(body, delivery_id="d-prompt"))
    assert status == 204  # 2xx: MLflow must not count it as a failed delivery
    assert _queued(requests) == []
    infos = _messages(caplog, logging.INFO)
    assert len(infos) == 1 and "ignored" in infos[0] and "prompt.created" in infos[0] and "d-prompt" in infos[0]
    assert not _messages(caplog, logging.WARNING)


def test_webhooks_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = {"type": "mlflow", "config": {"tracking_uri": "http://127.0.0.1:1"}}
    monkeypatch.delenv("MLFLOW_DATAHUB_WEBHOOK_SECRET", raising=False)
    cfg = parse({"source": source, "webhooks": {}})
    assert cfg.webhooks is not None
    with pytest.raises(ConfigError, match=r"webhooks\.secret"):
        cfg.webhooks.resolved_secret()
    monkeypatch.setenv("MLFLOW_DATAHUB_WEBHOOK_SECRET", "from-env")
    assert cfg.webhooks.resolved_secret() == "from-env"
    assert cfg.webhooks.resolved_url() == "http://127.0.0.1:8790/webhooks/mlflow"
    assert parse({"source": source}).webhooks is None
    with pytest.raises(ConfigError, match=r"webhooks\.listen"):
        parse({"source": source, "webhooks": {"listen": "localhost"}})
    wildcard = parse({"source": source, "webhooks": {"listen": "0.0.0.0:8790", "secret": "s"}}).webhooks
    assert wildcard is not None
    with pytest.raises(ConfigError, match=r"webhooks\.url"):
        wildcard.resolved_url()


def test_run_without_a_secret_stops_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MLFLOW_DATAHUB_WEBHOOK_SECRET", raising=False)
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"source": {"type": "mlflow", "config": {"tracking_uri": "http://127.0.0.1:1"}},
                                "kafka": {"bootstrap_servers": "127.0.0.1:1", "schema_registry_url": "http://x"},
                                "webhooks": {"listen": "127.0.0.1:8790"}}))
    for command in ("run", "produce", "webhooks"):  # before Kafka or MLflow is contacted
        args = [command, "install", "-c", str(path)] if command == "webhooks" else [command, "-c", str(path)]
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert "configuration error: webhooks.secret: not set" in err and "Traceback" not in err, err


# -- end to end with a real MLflow server -------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_mlflow(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-webhooks"), mlflow_template, env=LOOPBACK_DELIVERY)
    yield server.start()
    server.stop()


def _version_aspects(cfg, urn: str) -> tuple[MLModelPropertiesClass | None, VersionPropertiesClass | None]:  # noqa: ANN001
    properties = version = None
    for key, mcp in read_mcps(cfg):
        if key != urn:
            continue
        aspect = as_wrapper(mcp).aspect
        if isinstance(aspect, MLModelPropertiesClass):
            properties = aspect
        elif isinstance(aspect, VersionPropertiesClass):
            version = aspect
    return properties, version


def test_mlflow_delivers_webhooks_to_the_running_connector(webhook_mlflow: MlflowServer,
                                                           make_config: ConfigFactory, tmp_path: Path) -> None:
    started = time.monotonic()
    client = MlflowClient(webhook_mlflow.uri)
    name = "webhook model"
    client.create_registered_model(name)
    client.create_model_version(name, "s3://bucket/webhook-model/1")
    port = free_port()
    path, cfg = make_config(webhook_mlflow.uri, {
        "producer": {"poll_interval_seconds": 60},  # polling cannot be what delivers the changes below
        "webhooks": {"listen": f"127.0.0.1:{port}", "secret": SECRET, "name": "datahub-connector"},
    })

    first = run_cli("webhooks", "install", "-c", str(path), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("created webhook 'datahub-connector'"), first.stdout
    again = run_cli("webhooks", "install", "-c", str(path), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("updated webhook 'datahub-connector'"), again.stdout
    hooks = [h for h in client.list_webhooks() if h.name == "datahub-connector"]
    assert len(hooks) == 1
    assert hooks[0].url == f"http://127.0.0.1:{port}{PATH}"
    assert str(hooks[0].status) == "ACTIVE"
    assert sorted(str(e) for e in hooks[0].events) == sorted(EVENTS)

    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "connector.cli", "run", "-c", str(path)], cwd=REPO,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        urn = model_urn(name, "1", MappingSettings())

        def wait_for(what: str, condition: Callable[[], bool], seconds: float) -> float:
            deadline = time.monotonic() + seconds
            while not condition():
                assert process.poll() is None, f"connector exited: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{what} not seen in {seconds:.0f} s: " \
                                                    f"{log_path.read_text()[-3000:]}"
                time.sleep(0.2)
            return time.monotonic()

        # the first snapshot is done once the version's MCPs arrived; the next poll is 60 s away
        wait_for("the first snapshot", lambda: _version_aspects(cfg, urn)[0] is not None, 120)
        properties, version = _version_aspects(cfg, urn)
        assert properties is not None and "stage" not in (properties.customProperties or {})
        assert version is not None and not version.aliases

        written, written_wall = time.monotonic(), time.time()
        client.set_model_version_tag(name, "1", "stage", "canary")  # neither moves a timestamp
        client.set_registered_model_alias(name, "champion", "1")

        def both_arrived() -> bool:
            properties, version = _version_aspects(cfg, urn)
            return (properties is not None and (properties.customProperties or {}).get("stage") == "canary"
                    and version is not None and [a.versionTag for a in version.aliases or []] == ["champion"])

        arrived = wait_for("the tag and alias on the MCP topic", both_arrived, 15)
        print(f"\nwebhook latency: MLflow write -> MCP with tag and alias on the topic: {arrived - written:.2f} s "
              f"(MCP topic polled every 0.2 s plus a topic read)")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    log = log_path.read_text()
    assert process.returncode == 0, log[-3000:]
    assert "webhook receiver listening on" in log
    assert f"webhook accepted: model_version_tag.set for registered model '{name}'" in log, log[-3000:]
    assert f"webhook accepted: model_version_alias.created for registered model '{name}'" in log, log[-3000:]
    assert "webhook rejected" not in log
    accepted = [line for line in log.splitlines() if "webhook accepted: model_version_tag.set" in line][0]
    accepted_wall = datetime.strptime(accepted[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(f"MLflow write (set_model_version_tag called) -> webhook accepted by the connector: "
          f"{accepted_wall - written_wall:.3f} s")
    print(f"end-to-end test: {time.monotonic() - started:.1f} s")
