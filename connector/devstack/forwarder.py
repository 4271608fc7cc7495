"""A loopback TCP port in front of a local service, for measuring and for outages: every connection is
passed on to the service (one upstream connection and two pumps per client connection).

`on_request(data)` sees the first bytes a client sends after the service's last answer, which for
HTTP/1.1 without pipelining (what MLflow's client, DataHub's source and the registry client speak) is
the start of a request; it runs before they are passed on, so it may note the request or hold it (a
network's latency). The port is bound at once but listens only from `open()`: until then a connection
is refused, as by a service that is down.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

CHUNK = 262144


class Forwarder:
    def __init__(self, target: tuple[str, int], on_request: Callable[[bytes], None] | None = None) -> None:
        self.target = target
        self.on_request = on_request
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> Forwarder:
        """Start accepting connections (in a thread of its own)."""
        self.listener.listen(128)
        threading.Thread(target=self._accept, name=f"forwarder-{self.port}", daemon=True).start()
        return self

    def close(self) -> None:
        """Stop accepting, and cut every connection."""
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        with self._lock:
            sockets = [self.listener, *self._open]
        for s in sockets:
            _close(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._closed.is_set():
                _close(client)
                _close(upstream)
                return
            self._open |= {client, upstream}
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answered = threading.Event()
        answered.set()  # the first bytes from the client begin a request

        def sent(data: bytes) -> None:
            if answered.is_set():
                answered.clear()
                if self.on_request is not None:
                    self.on_request(data)

        def answers() -> None:
            _pump(upstream, client, lambda _: answered.set())
            with self._lock:
                self._open -= {client, upstream}
            _close(client)
            _close(upstream)

        threading.Thread(target=answers, daemon=True).start()
        _pump(client, upstream, sent)


def _pump(source: socket.socket, sink: socket.socket, seen: Callable[[bytes], None]) -> None:
    """Copy `source` to `sink` until either ends; then end both."""
    try:
        while data := source.recv(CHUNK):
            seen(data)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
