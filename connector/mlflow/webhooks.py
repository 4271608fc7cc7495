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

The receiver cannot be tied up: at most `max_connections` connections are served at once (a thread
each); a request must arrive whole (line, headers, body) within `request_timeout_seconds` however
slowly it trickles in; the signature headers are checked (present, well-formed, fresh) before the body
is read; at the cap, a new connection takes the place of the one that has waited longest (over a
second) for its request, else it gets a 503 at once. Refused, slow and over-long requests are logged
once, then counted: at most one line per kind a minute.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import math
import re
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from connector.config import WebhooksConfig
from connector.errors import ConfigError

log = logging.getLogger("connector.webhooks")

PATH = "/webhooks/mlflow"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MAX_BODY_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line and headers (MLflow sends about 400 bytes)
MAX_REMEMBERED_DELIVERIES = 100_000
DEFAULT_MAX_CONNECTIONS = 64  # as WebhooksConfig
DEFAULT_REQUEST_TIMEOUT_SECONDS = 5.0
# An authentic delivery sends its whole request at once: a connection that has waited this long for its
# request (a slow one, or an idle keep-alive) gives its place up to a new connection when all are taken.
EVICTABLE_AFTER_SECONDS = 1.0
LOG_WINDOW_SECONDS = 60.0

_DELIVERY_ID = re.compile(r"[!-~]{1,200}")  # MLflow sends a UUID
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_V1_VALUE = re.compile(r"[A-Za-z0-9+/]{43}=")  # base64 of an HMAC-SHA256
MAX_SIGNATURE_HEADER = 1024  # a few space-separated signatures (secret rotation)

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


class NotQueued(Exception):
    """A delivery that could not be handed on (the webhook-requests topic did not take it): answered 503, so
    that MLflow delivers it again."""


class RefreshRequests(Protocol):
    """Where accepted deliveries go: the producer's queue, or the webhook-requests topic (`put` returns once
    the request is kept; NotQueued if it is not)."""

    def put(self, item: str) -> None: ...


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

    def check_headers(self, headers: Mapping[str, str]) -> None:
        """What can be refused before the body is read: the three headers present and well-formed, the
        timestamp fresh. Raises Rejected."""
        delivery_id = headers.get(DELIVERY_ID_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if not signature:
            raise Rejected(401, f"no {SIGNATURE_HEADER} header")
        if not delivery_id or not timestamp:
            raise Rejected(400, f"no {DELIVERY_ID_HEADER if not delivery_id else TIMESTAMP_HEADER} header")
        if not _DELIVERY_ID.fullmatch(delivery_id):
            raise Rejected(400, f"{DELIVERY_ID_HEADER} is not well-formed")
        if not _UNIX_SECONDS.fullmatch(timestamp):
            raise Rejected(400, f"{TIMESTAMP_HEADER} is not Unix seconds")
        if len(signature) > MAX_SIGNATURE_HEADER or not any(
                version == SIGNATURE_VERSION and _V1_VALUE.fullmatch(value)
                for version, _, value in (candidate.partition(",") for candidate in signature.split())):
            raise Rejected(401, "signature does not match")  # none of them could match: no v1,<base64 HMAC>
        sent, now = int(timestamp), self.clock()
        if abs(now - sent) > self.max_age:
            raise Rejected(400, f"timestamp {abs(now - sent):.0f} s in the {'past' if sent < now else 'future'} "
                                f"(accepted: {self.max_age:.0f} s)")

    def verify(self, headers: Mapping[str, str], body: bytes) -> Delivery:
        self.check_headers(headers)
        delivery_id, timestamp = headers[DELIVERY_ID_HEADER], headers[TIMESTAMP_HEADER]
        if not self._signed(delivery_id, timestamp, body, headers[SIGNATURE_HEADER]):
            raise Rejected(401, "signature does not match")
        delivery = _parse(delivery_id, body)
        sent, now = int(timestamp), self.clock()
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


class _LogLimiter:
    """Warnings by kind, at most `per_window` lines of a kind a minute: the ones held back are counted and
    reported in one line (with the latest of them) once the minute is over, so that a flood of
    connections does not become a flood of log lines."""

    def __init__(self, window: float = LOG_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, per_window: int, message: str, *args: object) -> None:
        now = self.clock()
        with self._lock:
            state = self._kinds.setdefault(kind, _Kind(per_window))
            state.forget(now - self.window)
            if state.held or len(state.lines) >= state.per_window:
                if not state.held:
                    state.held_since = now
                state.held += 1
                state.latest = (message, args)
                return
            state.lines.append(now)
        log.warning(message, *args)

    def flush(self, everything: bool = False) -> None:
        """The counts whose minute is over (all of them with `everything`), one line each."""
        now = self.clock()
        due: list[tuple[int, float, str, tuple[object, ...]]] = []
        with self._lock:
            for state in self._kinds.values():
                state.forget(now - self.window)
                if state.held and (everything or len(state.lines) < state.per_window):
                    due.append((state.held, now - state.held_since, *state.latest))
                    state.lines.append(now)
                    state.held = 0
        for held, seconds, message, args in due:
            log.warning("%d more in %.0f s like this one: " + message, held, seconds, *args)


class _Kind:
    def __init__(self, per_window: int) -> None:
        self.per_window = per_window
        self.lines: deque[float] = deque()  # when lines of this kind were logged, within the window
        self.held = 0
        self.held_since = 0.0
        self.latest: tuple[str, tuple[object, ...]] = ("", ())

    def forget(self, before: float) -> None:
        while self.lines and self.lines[0] <= before:
            self.lines.popleft()


def _raw_response(status: int, phrase: str, error: str, extra_headers: str = "") -> bytes:
    body = json.dumps({"error": error}).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n").encode() + body


# Retry-After: by then, every connection that took the places before this refusal has waited long enough
# to give its place up, so that a retry (MLflow's, after a 503) gets in unless new connections took them all.
_BUSY = _raw_response(503, "Service Unavailable", "too many connections",
                      f"Retry-After: {math.ceil(EVICTABLE_AFTER_SECONDS)}\r\n")
_HEAD_TOO_LARGE = _raw_response(431, "Request Header Fields Too Large", "request line and headers too large")


class _Closed(TimeoutError):
    """The request can no longer complete: its deadline passed, or its connection's place was given to a
    new one. A TimeoutError, so that http.server ends the connection without an answer."""


class _HeadTooLarge(Exception):
    pass


class _Slot:
    """One connection among `max_connections`, with the deadline of the request it is waiting for."""

    def __init__(self, sock: socket.socket, client: str, timeout: float, now: float) -> None:
        self.sock = sock
        self.client = client
        self.timeout = timeout
        self.requests = 0  # requests begun on this connection
        self.evicted = False  # its place was given to a new connection
        self.begin(now)

    def begin(self, now: float) -> None:
        self.waiting_since = now  # when it began waiting for its current request (or its first byte)
        self.deadline = now + self.timeout
        self.received = 0  # bytes read since (the request's, and what came after it)
        self.head_done = False
        self.busy = False  # the request is read: it is being answered, and keeps its place
        self.expired = False
        self.eof = False


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as http.server reads it, held to the deadline of the whole request: each
    read waits only for what is left of it, so sending a byte at a time does not extend it."""

    def __init__(self, slot: _Slot) -> None:
        super().__init__()
        self._slot = slot

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        slot = self._slot
        if slot.evicted:
            raise _Closed("its place went to a new connection")
        if not slot.head_done and slot.received > MAX_HEAD_BYTES:
            raise _HeadTooLarge()
        remaining = slot.deadline - time.monotonic()
        if remaining <= 0:
            slot.expired = True
            raise _Closed("request not complete in time")
        slot.sock.settimeout(remaining)
        try:
            n = slot.sock.recv_into(buffer)
        except TimeoutError:
            slot.expired = True
            raise _Closed("request not complete in time") from None
        except OSError:
            if slot.evicted:
                raise _Closed("its place went to a new connection") from None
            raise
        if not n:
            if slot.evicted:  # shut down to make room: not the client's end
                raise _Closed("its place went to a new connection")
            slot.eof = True
            return 0
        if not slot.received and slot.requests > 1:
            # A kept-alive connection's next request: its deadline runs from its first byte (the idle time
            # before it was bounded by the same timeout).
            now = time.monotonic()
            slot.waiting_since, slot.deadline = now, now + slot.timeout
        slot.received += n
        return n


def _shutdown(sock: socket.socket) -> None:
    """Ends a connection another thread may be reading: its recv returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    slot: _Slot

    def setup(self) -> None:
        super().setup()
        self.slot = self.server.slot_of(self.request)
        self.rfile.close()  # the plain socket file, replaced by one held to the request's deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.slot))

    def handle_one_request(self) -> None:
        self.server.next_request(self.slot)
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self.close_connection = True
            if self.server.claim(self.slot):
                self.server.warnings.warning(
                    "too large", 1, "webhook rejected (431): request line and headers over %d bytes; from %s",
                    MAX_HEAD_BYTES, self.client_address[0])
                self.connection.settimeout(self.server.request_timeout)
                self.connection.sendall(_HEAD_TOO_LARGE)
        slot = self.slot
        if slot.expired and (slot.received or slot.requests == 1):
            self.server.warnings.warning(
                "slow", 1, "webhook receiver: closed a connection from %s: its request was not complete within "
                "%.0f s (webhooks.request_timeout_seconds; %d bytes received)", slot.client, slot.timeout,
                slot.received)
        elif slot.expired:
            log.debug("webhook receiver: closed an idle keep-alive connection from %s", slot.client)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.slot.head_done = True
        if self.slot.eof:  # the client went away before its headers ended: nobody to answer
            self.close_connection = True
            return False
        return parsed

    def handle_expect_100(self) -> bool:
        return True  # "100 Continue" is sent by do_POST, once the signature headers are checked

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path != PATH:
            self._reject(404, "no such path")
            return
        try:  # before the body is read: an unsigned or stale request is answered at once
            self.server.verifier.check_headers(self.headers)
        except Rejected as e:
            self._reject(e.status, e.reason)
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
        if str(self.headers.get("Expect", "")).lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        body = self.rfile.read(length)
        if len(body) != length:
            self._reject(400, "body shorter than its Content-Length")
            return
        if not self.server.claim(self.slot):  # read, but its place went to another connection meanwhile
            self.close_connection = True
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
        try:
            self.server.refresh_requests.put(delivery.model_name)
        except NotQueued as e:
            self._reject(503, f"accepted but not kept: {e}")
            return
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
        self.close_connection = True  # an unread body must not be taken for the next request
        if not self.server.claim(self.slot):
            return
        self.server.warnings.warning(*_kind(status), "webhook rejected (%d): %s; %s %s from %s, delivery %s", status,
                                     reason, self.command, _printable(urlsplit(self.path).path),
                                     self.client_address[0], _printable(self.headers.get(DELIVERY_ID_HEADER)))
        self._respond(status, {"error": reason}, {"Connection": "close", **(headers or {})})

    def _respond(self, status: int, body: dict[str, Any] | None, headers: Mapping[str, str] | None = None) -> None:
        if not self.server.claim(self.slot):
            self.close_connection = True
            return
        self.connection.settimeout(self.server.request_timeout)  # writing, no longer the request's deadline
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
        self.close_connection = True
        if self.slot.eof or not self.server.claim(self.slot):
            return  # the client went away, or its place went to another connection: nobody to answer
        self.server.warnings.warning(*_kind(code), "webhook rejected (%d): %s; from %s", code,
                                     message or "malformed request", self.client_address[0])
        self.connection.settimeout(self.server.request_timeout)
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass  # one line per outcome is logged above

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("webhook connection: " + format, *args)


def _kind(status: int) -> tuple[str, int]:
    """A rejection's kind for the log, and how many lines of it a minute: an over-long request is logged
    once a minute, other rejections (which name their delivery) up to ten times."""
    return ("too large", 1) if status in (413, 414, 431) else (f"rejected {status}", 10)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # a burst of connections waits in the kernel's queue, to be served or refused

    def __init__(self, address: tuple[str, int], verifier: Verifier, refresh_requests: RefreshRequests,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.verifier = verifier
        self.refresh_requests = refresh_requests
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.warnings = _LogLimiter()
        self._slots: dict[socket.socket, _Slot] = {}  # every connection a thread serves
        self._held = 0  # those among them that hold a place (not given away)
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN (reverse DNS), which can stall start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """In the accepting thread: a place for the new connection (a free one, or the one of the connection
        that has waited longest, over EVICTABLE_AFTER_SECONDS, for its request), else a 503 at once."""
        now = time.monotonic()
        victim: _Slot | None = None
        admitted = True
        with self._lock:
            if self._held >= self.max_connections:
                victim = min((s for s in self._slots.values() if not s.busy and not s.evicted
                              and now - s.waiting_since >= EVICTABLE_AFTER_SECONDS),
                             key=lambda s: s.waiting_since, default=None)
                if victim is None:
                    admitted = False
                else:
                    victim.evicted = True
                    self._held -= 1
            if admitted:
                self._slots[request] = _Slot(request, str(client_address[0]), self.request_timeout, now)
                self._held += 1
        if victim is not None:
            _shutdown(victim.sock)
            self.warnings.warning(
                "evicted", 1, "webhook receiver: closed a connection from %s that had waited %.1f s for its request "
                "(%d bytes received), to make room for a new one (webhooks.max_connections: %d)", victim.client,
                now - victim.waiting_since, victim.received, self.max_connections)
        if not admitted:
            self._refuse(request, str(client_address[0]))
            return
        super().process_request(request, client_address)

    def _refuse(self, sock: socket.socket, client: str) -> None:
        """A 503 (which MLflow retries, after its Retry-After) and the connection closed, without waiting."""
        try:
            sock.setblocking(False)
            try:
                sock.recv(MAX_HEAD_BYTES)  # what already came: read, so that the close does not reset the answer
            except OSError:
                pass
            sock.send(_BUSY)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
        self.warnings.warning(
            "cap", 1, "webhook receiver: refused a connection from %s (503): %d connections served, none of them "
            "waiting over %.0f s for its request (webhooks.max_connections)", client, self.max_connections,
            EVICTABLE_AFTER_SECONDS)

    def slot_of(self, request: socket.socket) -> _Slot:
        with self._lock:
            return self._slots[request]

    def next_request(self, slot: _Slot) -> None:
        with self._lock:
            if slot.requests:  # a kept-alive connection, waiting for its next request
                slot.begin(time.monotonic())
            slot.requests += 1

    def claim(self, slot: _Slot) -> bool:
        """The request is read (or answered without its body): its connection keeps its place until the
        answer is written. False if the place went to another connection first."""
        with self._lock:
            if slot.evicted:
                return False
            slot.busy = True
            return True

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._lock:
            slot = self._slots.pop(request, None)
            if slot is not None and not slot.evicted:
                self._held -= 1
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """At stop: the connections still waiting for a request end now."""
        with self._lock:
            waiting = [s for s in self._slots.values() if not s.busy and not s.evicted]
            for slot in waiting:
                slot.evicted = True
                self._held -= 1
        for slot in waiting:
            _shutdown(slot.sock)

    def service_actions(self) -> None:
        self.warnings.flush()  # every poll interval, in the accepting thread

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away (reset, broken pipe)
            log.debug("webhook connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("webhook receiver: unexpected error on a connection from %s", client_address[0])


class WebhookReceiver:
    """`POST /webhooks/mlflow` on (host, port), served by a background thread until stop()."""

    def __init__(self, host: str, port: int, secret: str, max_age_seconds: float,
                 refresh_requests: RefreshRequests, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS) -> None:
        self.verifier = Verifier(secret, max_age_seconds)
        # binds now: OSError if taken
        self._server = _Server((host, port), self.verifier, refresh_requests, max_connections, request_timeout_seconds)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: WebhooksConfig, refresh_requests: RefreshRequests) -> WebhookReceiver:
        host, port = cfg.listen_address()
        try:
            return cls(host, port, cfg.resolved_secret(), cfg.max_age_seconds, refresh_requests,
                       max_connections=cfg.max_connections, request_timeout_seconds=cfg.request_timeout_seconds)
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
        log.info("webhook receiver listening on %s (up to %d connections, %.0f s per request)", self.url,
                 self._server.max_connections, self._server.request_timeout)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.close_connections()
        self._server.server_close()
        self._server.warnings.flush(everything=True)
