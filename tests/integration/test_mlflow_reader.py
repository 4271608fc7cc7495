"""Polite to MLflow: the request rate limit, 429 with Retry-After, and retries while MLflow is down.

A small HTTP proxy on loopback stands between the reader and a real `mlflow server`: it forwards
requests, records when each arrived, and can answer 429 (with Retry-After) or refuse connections,
the way a rate-limited managed MLflow does."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from connector.devstack.mlflow_server import MlflowServer, free_port
from connector.mlflow.listing import UntrustedListing, full_listing
from connector.mlflow.reader import MlflowReader, MlflowUnavailable, ReaderSettings


class Proxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", free_port()), ProxyHandler)
        self.upstream = upstream
        self.arrivals: list[float] = []
        self.throttle_next = 0
        self.retry_after = "1"
        self.answers: dict[str, bytes] = {}  # path fragment -> the body answered instead of MLflow's
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        with self.server.lock:
            self.server.arrivals.append(time.monotonic())
            throttle = self.server.throttle_next > 0
            if throttle:
                self.server.throttle_next -= 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if throttle:
            self.send_response(429)
            self.send_header("Retry-After", self.server.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
            payload = next((b for fragment, b in self.server.answers.items() if fragment in self.path), payload)
            self.send_response(response.status)
            self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    do_GET = do_POST = _forward


@pytest.fixture
def proxy(demo_mlflow: MlflowServer) -> Iterator[Proxy]:
    server = Proxy(demo_mlflow.uri)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_requests_respect_the_rate_limit(proxy: Proxy) -> None:
    reader = MlflowReader(ReaderSettings(proxy.uri, proxy.uri, max_requests_per_second=4))
    for _ in range(6):
        reader.check()
    arrivals = proxy.arrivals
    assert len(arrivals) == 6
    # 4 per second: any k requests span at least k x 0.25 s. Arrival times carry the jitter of two
    # processes' scheduling (a request that arrives late shortens the next gap by as much), so each
    # span is allowed 0.1 s of it; without the limit, six requests arrive within a few milliseconds.
    short = [(i, j, round(arrivals[j] - arrivals[i], 3)) for i in range(6) for j in range(i + 1, 6)
             if arrivals[j] - arrivals[i] < (j - i) * 0.25 - 0.1]
    assert not short, short
    assert arrivals[-1] - arrivals[0] >= 5 * 0.25 - 0.1


def test_429_with_retry_after_is_honoured(proxy: Proxy) -> None:
    proxy.throttle_next = 2
    proxy.retry_after = "1"
    reader = MlflowReader(ReaderSettings(proxy.uri, proxy.uri))
    experiments = [e.name for page in reader.experiments() for e in page]
    assert "demo/training runs" in experiments
    assert len(proxy.arrivals) >= 3
    # Each retry waited at least what Retry-After asked for.
    assert proxy.arrivals[1] - proxy.arrivals[0] >= 0.9
    assert proxy.arrivals[2] - proxy.arrivals[1] >= 0.9


def test_outage_is_retried_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    reader = MlflowReader(ReaderSettings(uri, uri, retry_initial_seconds=0.2, retry_max_seconds=0.4,
                                         retry_for_seconds=8))
    with caplog.at_level("WARNING"), pytest.raises(MlflowUnavailable) as error:
        reader.check()
    assert "did not answer" in str(error.value)
    retries = [r for r in caplog.records if "MLflow at " in r.getMessage() and " unreachable (" in r.getMessage()]
    assert len(retries) >= 2
    assert all(r.exc_info is None for r in caplog.records), "expected conditions log without stack traces"


def test_a_stop_ends_the_wait_for_mlflow_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """A reader that retries until MLflow answers (`run`, `produce`) still ends its wait when the process
    stops: an outage must not keep a stopping connector (SIGTERM) waiting."""
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    reader = MlflowReader(ReaderSettings(uri, uri, retry_initial_seconds=30, retry_for_seconds=None))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader.check()
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=read, daemon=True)
    with caplog.at_level("WARNING", logger="connector.mlflow_reader"):
        thread.start()
        # Once the first attempt has failed (MLflow's HTTP client retries a refused connection itself
        # first), the reader waits 30 s before the next.
        deadline = time.monotonic() + 30
        while "retry 1 in 30 s" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "retry 1 in 30 s" in caplog.text and thread.is_alive()
    stopped = time.monotonic()
    reader.stopping.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - stopped < 2
    assert isinstance(outcome[0], MlflowUnavailable) and "not retried: stopping" in str(outcome[0])


def test_a_smaller_first_page_then_full_pages_read_everything_once(demo_mlflow: MlflowServer) -> None:
    """Reads newest first start with a small page (an idle cycle usually stops there); MLflow's page
    tokens are offsets, so the next pages, at full size, continue exactly where it ended."""
    reader = MlflowReader(ReaderSettings(demo_mlflow.uri, demo_mlflow.uri, page_size=2, model_version_page_size=2))
    order = ["last_updated_timestamp DESC"]

    def listing(first_page: int | None, what: str) -> list[list[tuple[str, str]]]:
        if what == "versions":
            return [[(v.name, v.version) for v in page] for page in reader.model_versions(order_by=order,
                                                                                          first_page=first_page)]
        return [[(m.name, "") for m in page] for page in reader.registered_models(order_by=order,
                                                                                  first_page=first_page)]

    for what in ("versions", "models"):  # the demo has 2 models and more versions
        full = [item for page in listing(None, what) for item in page]
        assert len(full) >= 2 and len(set(full)) == len(full)
        pages = listing(1, what)
        assert [len(p) for p in pages[:2]] == [1, min(2, len(full) - 1)]
        assert [item for page in pages for item in page] == full


def test_prefetch_requests_the_next_page_while_the_caller_works(proxy: Proxy) -> None:
    reader = MlflowReader(ReaderSettings(proxy.uri, proxy.uri, page_size=2))
    ids = [e.experiment_id for page in reader.experiments() for e in page]
    plain = [r.info.run_id for page in reader.runs(ids) for r in page]
    assert len(plain) >= 5
    proxy.arrivals.clear()
    pages = reader.runs(ids, first_page=1, prefetch=True)
    first = next(pages)
    time.sleep(1.0)  # the caller at work on the first page
    rest = [r.info.run_id for page in pages for r in page]
    assert [r.info.run_id for r in first] + rest == plain
    assert len(first) == 1
    # The second page was asked for at once, not after the caller's second.
    assert proxy.arrivals[1] - proxy.arrivals[0] < 0.6, proxy.arrivals
    assert len(proxy.arrivals) == 1 + (len(plain) - 1 + 1) // 2


def test_a_registry_search_that_answers_nothing_makes_the_listing_untrusted(proxy: Proxy) -> None:
    """An MLflow 2.x server answers the MLflow 3 client's prompt filter with nothing: registered models
    missing while their versions are listed. The listing is not taken as complete."""
    proxy.answers["registered-models/search"] = b"{}"
    reader = MlflowReader(ReaderSettings(proxy.uri, proxy.uri, retry_for_seconds=5))
    with pytest.raises(UntrustedListing) as e:
        list(full_listing(reader))
    assert "did not return (e.g. 'demo classifier')" in str(e.value)
    assert "answered inconsistently 3 times" in str(e.value)


def test_a_version_search_that_answers_nothing_makes_the_listing_untrusted(proxy: Proxy) -> None:
    proxy.answers["model-versions/search"] = b"{}"
    reader = MlflowReader(ReaderSettings(proxy.uri, proxy.uri, retry_for_seconds=5))
    with pytest.raises(UntrustedListing, match="latest versions of registered models that the search of model "
                                               "versions did not return"):
        list(full_listing(reader))
