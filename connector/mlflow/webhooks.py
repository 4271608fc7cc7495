"""MLflow webhooks (3.3+): an HTTP receiver that turns each authentic model-registry event into a
targeted read of the registered model it names, and `install`, which registers the receiver in MLflow.

What MLflow 3.17 sends (mlflow/webhooks/delivery.py): `POST <url>` with a JSON body
`{"entity", "action", "timestamp" (ISO-8601), "data": {"name": <registered model>, ...}}` (plus
`"workspace"` when MLflow runs with workspaces) and the headers `X-MLflow-Delivery-Id` (a UUID),
`X-MLflow-Timestamp` (Unix seconds) and `X-MLflow-Signature`: `v1,` + base64 HMAC-SHA256 with the
webhook's secret over `{delivery_id}.{timestamp}.{body}`. MLflow retries 429 and 5xx only; delivery is
fire-and-forget, so the producer's polling and reconciliation stay on and webhooks only make things
faster.

The receiver answers within milliseconds: it authenticates (constant-time signature comparison,
timestamp within `max_age_seconds` either way, delivery id not accepted before) and puts the model's
name on the producer's `refresh_requests` queue; the producer does the read between its poll cycles.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import socket
import socketserver
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from connector.config import ConnectorConfig, WebhooksConfig
from connector.errors import ConfigError, OperatorError

log = logging.getLogger("connector.webhooks")

PATH = "/webhooks/mlflow"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MAX_BODY_BYTES = 1024 * 1024
MAX_REMEMBERED_DELIVERIES = 100_000

# The model-registry events the connector follows; each payload's data.name is the registered model.
EVENTS = (
    "registered_model.created",
    "model_version.created",
    "model_version_tag.set",
    "model_version_tag.deleted",
    "model_version_alias.created",
    "model_version_alias.deleted",
)


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature header value for a delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    return f"{SIGNATURE_VERSION}," + base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()
                                                      ).decode()


class Rejected(Exception):
    """A request that is not an authentic, fresh, first delivery: answered with `status`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    event: str
    model_name: str | None  # None: an authentic event the connector does not follow


class Verifier:
    """Authenticates deliveries; remembers accepted delivery ids until their timestamp is stale."""

    def __init__(self, secret: str, max_age_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self.max_age = max_age_seconds
        self.clock = clock
        self._accepted: OrderedDict[str, float] = OrderedDict()  # delivery id -> when its timestamp goes stale
        self._lock = threading.Lock()

    def verify(self, headers: Mapping[str, str], body: bytes) -> Delivery:
        delivery_id = headers.get(DELIVERY_ID_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if not signature:
            raise Rejected(401, f"no {SIGNATURE_HEADER} header")
        if not delivery_id or not timestamp:
            raise Rejected(400, f"no {DELIVERY_ID_HEADER if not delivery_id else TIMESTAMP_HEADER} header")
        if not self._signed(delivery_id, timestamp, body, signature):
            raise Rejected(401, "signature does not match")
        try:
            sent = int(timestamp)
        except ValueError:
            raise Rejected(400, f"{TIMESTAMP_HEADER} is not Unix seconds") from None
        now = self.clock()
        if abs(now - sent) > self.max_age:
            raise Rejected(400, f"timestamp {abs(now - sent):.0f} s in the {'past' if sent < now else 'future'} "
                                f"(accepted: {self.max_age:.0f} s)")
        delivery = _parse(delivery_id, body)
        with self._lock:
            # Ids whose timestamp is past the accepted age can no longer come back fresh: forgotten.
            while self._accepted and next(iter(self._accepted.values())) < now:
                self._accepted.popitem(last=False)
            if delivery_id in self._accepted:
                raise Rejected(409, "delivery id already accepted (replay)")
            while len(self._accepted) >= MAX_REMEMBERED_DELIVERIES:  # bounded memory: the oldest goes first
                self._accepted.popitem(last=False)
            self._accepted[delivery_id] = sent + self.max_age
        return delivery

    def _signed(self, delivery_id: str, timestamp: str, body: bytes, header: str) -> bool:
        content = f"{delivery_id}.{timestamp}.".encode("latin-1", "replace") + body
        expected = base64.b64encode(hmac.new(self._secret, content, hashlib.sha256).digest())
        matched = False
        for candidate in header.split():  # Standard Webhooks allows several space-separated signatures
            version, _, value = candidate.partition(",")
            if version == SIGNATURE_VERSION:
                matched |= hmac.compare_digest(expected, value.encode("latin-1", "replace"))
        return matched


def _parse(delivery_id: str, body: bytes) -> Delivery:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Rejected(400, "body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Rejected(400, "body has no `data` object")
    event = f"{payload.get('entity')}.{payload.get('action')}"
    if event not in EVENTS:
        return Delivery(delivery_id, event, None)
    name = payload["data"].get("name")
    if not isinstance(name, str) or not name:
        raise Rejected(400, f"{event} without data.name")
    return Delivery(delivery_id, event, name)


def _printable(value: str | None, limit: int = 80) -> str:
    if value is None:
        return "-"
    text = "".join(c if c.isprintable() else "?" for c in value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may stay silent (also ends idle keep-alive connections)
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path != PATH:
            self._reject(404, "no such path")
            return
        if self.headers.get("Transfer-Encoding"):
            self._reject(411, "chunked bodies are not accepted")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reject(411, "no valid Content-Length")
            return
        if length > MAX_BODY_BYTES or length < 0:
            self._reject(413, f"body of {length} bytes (limit {MAX_BODY_BYTES})")
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self._reject(400, "body shorter than its Content-Length")
            return
        try:
            delivery = self.server.verifier.verify(self.headers, body)
        except Rejected as e:
            self._reject(e.status, e.reason)
            return
        if delivery.model_name is None:
            log.info("webhook %s ignored: %s is not an event the connector follows (delivery %s)",
                     PATH, _printable(delivery.event), _printable(delivery.delivery_id))
            self._respond(204, None)
            return
        self.server.refresh_requests.put(delivery.model_name)
        log.info("webhook accepted: %s for registered model '%s' (delivery %s): targeted read queued",
                 delivery.event, _printable(delivery.model_name, 200), _printable(delivery.delivery_id))
        self._respond(202, {"status": "accepted"})

    def _other(self) -> None:
        if urlsplit(self.path).path != PATH:
            self._reject(404, "no such path")
        else:
            self._reject(405, f"method {self.command} (only POST)", {"Allow": "POST"})

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _other  # noqa: N815

    def _reject(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        log.warning("webhook rejected (%d): %s; %s %s from %s, delivery %s", status, reason, self.command,
                    _printable(urlsplit(self.path).path), self.client_address[0],
                    _printable(self.headers.get(DELIVERY_ID_HEADER)))
        self.close_connection = True  # an unread body must not be taken for the next request
        self._respond(status, {"error": reason}, {"Connection": "close", **(headers or {})})

    def _respond(self, status: int, body: dict[str, Any] | None, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and status != 204:
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own rejections (malformed request line, oversized headers, unknown method)
        log.warning("webhook rejected (%d): %s; from %s", code, message or "malformed request",
                    self.client_address[0])
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass  # one line per outcome is logged above

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("webhook connection: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], verifier: Verifier, refresh_requests: queue.Queue[str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.verifier = verifier
        self.refresh_requests = refresh_requests
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN (reverse DNS), which can stall start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class WebhookReceiver:
    """`POST /webhooks/mlflow` on (host, port), served by a background thread until stop()."""

    def __init__(self, host: str, port: int, secret: str, max_age_seconds: float,
                 refresh_requests: queue.Queue[str]) -> None:
        self.verifier = Verifier(secret, max_age_seconds)
        self._server = _Server((host, port), self.verifier, refresh_requests)  # binds now: OSError if taken
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: WebhooksConfig, refresh_requests: queue.Queue[str]) -> WebhookReceiver:
        host, port = cfg.listen_address()
        try:
            return cls(host, port, cfg.resolved_secret(), cfg.max_age_seconds, refresh_requests)
        except OSError as e:
            raise ConfigError(f"webhooks.listen: cannot listen on {cfg.listen}: {e.strerror or e}") from None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}{PATH}"

    def start(self) -> WebhookReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="webhooks", daemon=True)
        self._thread.start()
        log.info("webhook receiver listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


# -- registration in MLflow -----------------------------------------------------------------------


class InstallError(OperatorError):
    """MLflow refused the webhook; the message says why and what to change."""


def install(cfg: ConnectorConfig) -> str:
    """Create the webhook named `webhooks.name` in MLflow, or bring the existing one up to date (URL,
    events, secret, ACTIVE). Returns what was done, in one line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from connector.mlflow.reader import reader_settings

    w = cfg.webhooks
    if w is None:
        raise ConfigError("webhooks: section missing (needs at least `secret`, or MLFLOW_DATAHUB_WEBHOOK_SECRET)")
    url, secret = w.resolved_url(), w.resolved_secret()
    settings = reader_settings(cfg)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    try:
        same_name = []
        token: str | None = None
        while True:
            page = client.list_webhooks(max_results=100, page_token=token)
            same_name += [h for h in page if h.name == w.name]
            token = page.token
            if not token:
                break
        if same_name:
            hook = client.update_webhook(same_name[0].webhook_id, url=url, events=list(EVENTS), secret=secret,
                                         status="ACTIVE")
            done = "updated"
        else:
            hook = client.create_webhook(w.name, url, list(EVENTS), secret=secret, status="ACTIVE",
                                         description="mlflow-datahub: targeted re-reads of changed models")
            done = "created"
    except MlflowException as e:
        message = str(e.message).splitlines()[0][:300]
        hint = ""
        if "scheme" in message:
            hint = " (an http:// URL needs MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https on the MLflow server)"
        elif "non-public" in message:
            hint = " (a private or loopback URL needs MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true on the MLflow server)"
        elif "500" in message:
            hint = (" (an MLflow server restarted without a fixed MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY cannot "
                    "decrypt the webhook secrets it stored before; see the MLflow server's log)")
        raise InstallError(f"MLflow at {settings.registry_uri} refused webhook '{w.name}': {message}{hint}") from None
    line = f"{done} webhook '{hook.name}' (id {hook.webhook_id}) in MLflow at {settings.registry_uri}: " \
           f"POST {hook.url}, {len(EVENTS)} events, status {hook.status}"
    if len(same_name) > 1:
        line += f"; {len(same_name) - 1} more webhooks named '{w.name}' left as they are: " + \
                ", ".join(h.webhook_id for h in same_name[1:])
    return line
