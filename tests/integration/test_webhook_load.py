"""The webhook receiver under load, over real sockets on loopback (no Kafka, no MLflow server): slow
connections cannot tie it up (a deadline for each whole request, a cap on connections, the longest-waiting
connection giving its place up), unsigned or stale requests are answered before their body is read, and
each kind of trouble is logged once, then counted."""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from connector.mlflow.webhooks import MAX_HEAD_BYTES, PATH, WebhookReceiver, sign

SECRET = "whsec-load-5d2e"
LOGGER = "connector.webhooks"


def _delivery(name: str, *, timestamp: int | None = None, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"entity": "model_version_tag", "action": "set", "timestamp": "2026-11-27T10:00:00+00:00",
                       "data": {"name": name, "version": "1", "key": "k", "value": "v"}}).encode()
    delivery_id, ts = str(uuid.uuid4()), str(int(time.time()) if timestamp is None else timestamp)
    return body, {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                  "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sign(secret, delivery_id, ts, body)}


def _post(port: int, name: str, *, retries: int = 0) -> tuple[int, int]:
    """One delivery as MLflow sends it (the same request again after a 429/5xx, once its Retry-After has
    passed, up to `retries` times): (last status, attempts). As urllib3 does, a connection closed while the
    request is sent still has its answer read (a refusal comes before the request is read)."""
    body, headers = _delivery(name)
    for attempt in range(1, retries + 2):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            try:
                connection.request("POST", PATH, body, headers)
            except (BrokenPipeError, ConnectionResetError):
                pass
            response = connection.getresponse()
            response.read()
            status, retry_after = response.status, float(response.getheader("Retry-After") or 1)
        finally:
            connection.close()
        if status not in (429, 503) or attempt > retries:
            return status, attempt
        time.sleep(retry_after)
    raise AssertionError("unreachable")


class SlowClients:
    """`count` connections, each sending a request a byte every `interval` seconds (half of them a request
    line, the others their headers after a complete request line), in one thread, for at most
    `limit_seconds`; all closed by stop(). Records when and how the receiver ended each one."""

    REQUEST_LINE = f"POST {PATH} HTTP/1.1\r\n".encode()
    HEADERS = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\nX-Filler: " + b"a" * 4096

    def __init__(self, port: int, count: int, interval: float = 0.2, limit_seconds: float = 20.0) -> None:
        self.port, self.count, self.interval, self.limit = port, count, interval, limit_seconds
        self.sockets: list[socket.socket] = []
        self.opened: list[float] = []
        self.pending: list[bytes] = []
        self.ended: dict[int, float] = {}  # socket index -> seconds after its connect when the receiver ended it
        self.answers: dict[int, bytes] = {}  # socket index -> what the receiver sent before ending it
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def start(self) -> SlowClients:
        for i in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.opened.append(time.monotonic())
            if i % 2:
                self.pending.append(self.HEADERS)
                sock.send(self.REQUEST_LINE)
            else:
                self.pending.append(self.REQUEST_LINE + self.HEADERS)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            for i, sock in enumerate(self.sockets):
                if i not in self.ended:
                    self._poll(i, sock)
            self._stop.wait(self.interval)

    def _poll(self, i: int, sock: socket.socket) -> None:
        try:
            while data := sock.recv(4096):
                self.answers[i] = self.answers.get(i, b"") + data
        except BlockingIOError:  # still open: the next byte
            try:
                sock.send(self.pending[i][:1])
                self.pending[i] = self.pending[i][1:]
                self.bytes_sent += 1
                return
            except OSError:
                pass
        except OSError:
            pass
        self.ended[i] = time.monotonic() - self.opened[i]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()

    def refused(self) -> list[int]:
        return [i for i, answer in self.answers.items() if answer.startswith(b"HTTP/1.1 503 ")]

    def open_count(self) -> int:
        return self.count - len(self.ended)


@pytest.fixture
def make_receiver() -> Iterator:
    servers: list[WebhookReceiver] = []

    def make(**settings: Any) -> tuple[WebhookReceiver, queue.Queue[str]]:
        requests: queue.Queue[str] = queue.Queue()
        servers.append(WebhookReceiver("127.0.0.1", 0, SECRET, 300, requests, **settings).start())
        return servers[-1], requests

    yield make
    for server in servers:
        server.stop()


def _warnings(caplog: pytest.LogCaptureFixture, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING and all(w in r.getMessage() for w in words)]


def test_an_authentic_delivery_lands_while_300_slow_connections_are_held(make_receiver,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver()  # the defaults: 64 connections, 5 s per request
    clients = SlowClients(server.port, 300, interval=0.2)
    try:
        clients.start()
        # At once, while the 64 places are taken by connections only just opened: a 503 with Retry-After,
        # and the same request again a second later (as MLflow retries) takes a slow connection's place.
        started = time.monotonic()
        status, attempts = _post(server.port, "model at once", retries=3)
        at_once = time.monotonic() - started
        assert status == 202 and requests.get_nowait() == "model at once"
        time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
        assert clients.open_count() >= 60, (clients.open_count(), clients.ended)  # still held, still trickling
        # Mid-attack: the delivery takes the place of the connection that has waited longest, in one attempt.
        started = time.monotonic()
        status, mid_attempts = _post(server.port, "model mid-attack")
        assert requests.get(timeout=2) == "model mid-attack"
        mid_attack = time.monotonic() - started
        assert status == 202 and mid_attempts == 1
        assert mid_attack < 2.0, mid_attack
        assert at_once < 3.0, at_once  # 1 s of it is the Retry-After MLflow waits (about 1.05 s on an idle machine)
        print(f"\nauthentic delivery under 300 slow connections: queued {mid_attack * 1000:.1f} ms after it was "
              f"sent mid-attack (1 attempt); {at_once:.2f} s when sent as the attack began ({attempts} attempts, "
              f"503 then Retry-After: 1); {clients.bytes_sent} slow bytes sent")
        # The connections over the cap were refused at once, with a 503; no slow one got an answer.
        refused = clients.refused()
        assert len(refused) >= 300 - 64, len(refused)
        assert max(clients.ended[i] for i in refused) < 1.0, sorted(clients.ended[i] for i in refused)[-5:]
        assert all(clients.answers.get(i, b"").startswith(b"HTTP/1.1 503 ") or not clients.answers.get(i)
                   for i in range(300))
    finally:
        clients.stop()
    # One line per kind, however many connections: refused at the cap, and closed to make room.
    assert len(_warnings(caplog, "refused a connection", "(503)")) == 1, _warnings(caplog, "refused")
    assert len(_warnings(caplog, "to make room")) == 1, _warnings(caplog, "to make room")
    assert not _warnings(caplog, "more in")  # the counts come once the minute is over, or at stop
    server.stop()
    summaries = _warnings(caplog, "more in")
    assert any("refused a connection" in s and int(s.split()[0]) >= 200 for s in summaries), summaries


def test_a_slow_request_is_closed_at_its_deadline_however_it_trickles(make_receiver,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver(request_timeout_seconds=1.0, max_connections=16)
    clients = SlowClients(server.port, 10, interval=0.1)  # a byte every 0.1 s: a per-read timeout never fires
    try:
        clients.start()
        waited = time.monotonic() + 4.0
        while len(clients.ended) < 10 and time.monotonic() < waited:
            time.sleep(0.1)
        assert sorted(clients.ended) == list(range(10)), clients.ended
        assert all(0.9 <= t < 2.0 for t in clients.ended.values()), clients.ended  # 1 s, and the 0.1 s polling
        assert not clients.answers  # closed, not answered
        assert _post(server.port, "after the slow ones")[0] == 202  # their places are free again
        assert requests.get_nowait() == "after the slow ones"
    finally:
        clients.stop()
    slow = _warnings(caplog, "was not complete within 1 s")
    assert len(slow) == 1 and "webhooks.request_timeout_seconds" in slow[0], slow
    server.stop()
    assert [s.split(" like")[0].split(" in ")[0] for s in _warnings(caplog, "more in", "not complete")] == ["9 more"]


def test_over_the_cap_a_new_connection_is_refused_at_once_or_takes_a_slow_ones_place(
        make_receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver(max_connections=4)
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)
        for _ in range(5):  # all four places taken by connections younger than a second: refused at once
            started = time.monotonic()
            assert _post(server.port, "refused") == (503, 1)
            assert time.monotonic() - started < 0.5
        assert requests.empty()
        time.sleep(1.0)  # now they have waited over a second for a request: each new connection takes one's place
        assert _post(server.port, "in a slow one's place") == (202, 1)
        assert requests.get_nowait() == "in a slow one's place"
        silent[0].settimeout(2)
        assert silent[0].recv(100) == b""  # the oldest was closed, without an answer
    finally:
        for sock in silent:
            sock.close()
    assert len(_warnings(caplog, "refused a connection")) == 1
    made_room = _warnings(caplog, "to make room")
    assert len(made_room) == 1 and "webhooks.max_connections: 4" in made_room[0], made_room
    server.stop()
    assert [s.split()[0] for s in _warnings(caplog, "more in", "refused a connection")] == ["4"]


def _headers_without_body(port: int, headers: dict[str, str]) -> tuple[int, float, bytes]:
    """Headers announcing a large body that never comes: (status, seconds to the answer, what followed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        started = time.monotonic()
        head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000\r\n" + \
               "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        answer = b""
        while data := sock.recv(65536):  # read to the end: the receiver closes the connection
            answer += data
        return int(answer.split()[1]), time.monotonic() - started, answer
    finally:
        sock.close()


@pytest.mark.parametrize(("change", "status", "reason"), [
    ("unsigned", 401, "no X-MLflow-Signature header"),
    ("stale", 400, "in the past"),
    ("future", 400, "in the future"),
    ("malformed signature", 401, "signature does not match"),
    ("malformed timestamp", 400, "not Unix seconds"),
    ("malformed delivery id", 400, "X-MLflow-Delivery-Id is not well-formed"),
    ("expecting 100-continue", 401, "no X-MLflow-Signature header"),
])
def test_unsigned_or_stale_headers_are_refused_before_the_body(make_receiver, caplog: pytest.LogCaptureFixture,
                                                               change: str, status: int, reason: str) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver()  # a 5 s deadline: an answer that waited for the body would come late
    _, headers = _delivery("m", timestamp=int(time.time()) - 301 if change == "stale" else
                           int(time.time()) + 301 if change == "future" else None)
    if change in ("unsigned", "expecting 100-continue"):
        del headers["X-MLflow-Signature"]
    if change == "expecting 100-continue":
        headers["Expect"] = "100-continue"
    if change == "malformed signature":
        headers["X-MLflow-Signature"] = "v1,not-an-hmac"
    if change == "malformed timestamp":
        headers["X-MLflow-Timestamp"] = "+" + headers["X-MLflow-Timestamp"]
    if change == "malformed delivery id":
        headers["X-MLflow-Delivery-Id"] = "a b"
    answered, seconds, answer = _headers_without_body(server.port, headers)
    assert (answered, seconds < 1.0) == (status, True), (answered, seconds, answer)  # not the 5 s deadline
    assert b"100 Continue" not in answer and b"Connection: close" in answer
    assert requests.empty()
    rejected = _warnings(caplog, f"({status})")
    assert len(rejected) == 1 and reason in rejected[0], rejected


def test_signed_headers_then_wait_for_the_body_until_the_deadline(make_receiver) -> None:
    server, requests = make_receiver(request_timeout_seconds=1.0)
    _, headers = _delivery("m")  # well-formed and fresh: only the body can tell whether the signature matches
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        started = time.monotonic()
        sock.sendall((f"POST {PATH} HTTP/1.1\r\nContent-Length: 900000\r\n" +
                      "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
        sock.sendall(b"{" * 1000)
        assert sock.recv(100) == b""  # closed at the deadline, unanswered
        assert 0.9 < time.monotonic() - started < 2.5
    finally:
        sock.close()
    assert requests.empty()


def test_an_over_long_head_is_refused_and_logged_once(make_receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver()
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            head = f"POST {PATH} HTTP/1.1\r\n".encode() + b"".join(
                b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 20))
            try:
                sock.sendall(head)
            except OSError:
                pass  # the receiver may close before it has all of it
            answer = b""
            try:
                while data := sock.recv(65536):
                    answer += data
            except ConnectionResetError:
                pass
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        finally:
            sock.close()
    assert requests.empty()
    assert len(_warnings(caplog, "(431)")) == 1, _warnings(caplog, "(431)")
    assert _post(server.port, "still served")[0] == 202


def test_a_kept_alive_connection_gets_a_whole_deadline_for_its_next_request(make_receiver,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, requests = make_receiver(request_timeout_seconds=1.5)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)

    def request(name: str) -> bytes:
        body, headers = _delivery(name)
        return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n" +
                "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body

    def response() -> bytes:  # one whole response: its head, then Content-Length bytes
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(4096)
        return head

    try:
        sock.sendall(request("first"))
        assert response().startswith(b"HTTP/1.1 202 ")
        time.sleep(0.9)  # idle, under the timeout
        second = request("second")
        sock.sendall(second[:20])
        time.sleep(0.9)  # 1.8 s after the answer, 0.9 s after the request's first byte: within its deadline
        sock.sendall(second[20:])
        assert response().startswith(b"HTTP/1.1 202 ")
        assert [requests.get_nowait(), requests.get_nowait()] == ["first", "second"]
        started = time.monotonic()
        assert sock.recv(100) == b""  # idle past the timeout: closed
        assert 1.3 < time.monotonic() - started < 3.0
    finally:
        sock.close()
    assert not _warnings(caplog)  # an idle keep-alive connection closing is no trouble
