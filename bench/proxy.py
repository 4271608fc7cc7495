"""A loopback TCP proxy in front of the bench's MLflow server that delays each HTTP request by N ms, as
MLflow across a network is, and stamps each request's arrival (the bench's clock for "first MLflow
request").

It runs as a process of its own (`python -m bench.proxy`), so that copying the answers costs the bench's
process nothing: `connector.devstack.forwarder.Forwarder` (per client connection, one connection to the
server and two pumps), which the tests use for outages too. A request is the
first bytes a client sends after the server's last answer (HTTP/1.1 without pipelining, which is what
MLflow's client and DataHub's source speak): those bytes wait N ms before they are passed on, and the
time and first line of each request are written to the request log, one line each:
`<epoch seconds> <method> <path>`. Connection set-up is not delayed (clients keep their connections).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from connector.devstack.forwarder import Forwarder


def stamp_and_hold(latency_ms: float, log: IO[str]) -> Callable[[bytes], None]:
    """What the proxy does with each request's first bytes: note its arrival, then hold it."""
    delay = latency_ms / 1000
    lock = threading.Lock()

    def on_request(data: bytes) -> None:
        now = time.time()
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        method, _, rest = line.partition(" ")
        with lock:
            log.write(f"{now:.6f} {method} {rest.rsplit(' ', 1)[0]}\n")
            log.flush()
        if delay:
            time.sleep(delay)

    return on_request


class LatencyProxy:
    """The proxy as the bench uses it: a process in front of `target_uri`; its URI, its requests."""

    def __init__(self, target_uri: str, latency_ms: float, log: Path) -> None:
        self.latency_ms = latency_ms
        self.log = log
        log.write_text("")
        target = target_uri.split("://", 1)[1].rstrip("/")
        repo = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen([sys.executable, "-m", "bench.proxy", "--target", target, "--latency-ms",
                                         str(latency_ms), "--log", str(log)], cwd=repo, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.uri = f"http://127.0.0.1:{self.port}"

    def requests(self, start: float, end: float | None = None) -> list[tuple[float, str]]:
        """(arrival, "METHOD path") of each request that arrived in [start, end)."""
        out = []
        for line in self.log.read_text().splitlines():
            stamp, _, request = line.partition(" ")
            try:
                t = float(stamp)
            except ValueError:
                continue
            if t >= start and (end is None or t < end) and "/health" not in request:
                out.append((t, request))
        return out

    def first(self, start: float, contains: str = "") -> float | None:
        """When the first request (whose line contains `contains`) arrived after `start`."""
        for t, request in self.requests(start):
            if contains in request:
                return t
        return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port of the MLflow server")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--log", required=True, help="request log file")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    with open(Path(args.log), "a") as log:
        proxy = Forwarder((host, int(port)), stamp_and_hold(args.latency_ms, log)).open()
        print(proxy.port, flush=True)  # the bench reads the port from the first line
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
