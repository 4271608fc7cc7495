"""MLflow edge: bulk, paged reads of the tracking server and the model registry.

Every listing is a paged search (no call per object). Failures are classified in one place
(`classify`), by HTTP status and exception type, never by the words of a message:

* no useful answer (no connection, a reset, a timeout, HTTP 5xx, 408 or 429, or a 200 whose body is
  empty, an HTML page or cut off): retried with exponential backoff and one log line per attempt
  (MLflow's own HTTP layer already honours 429 with Retry-After); `MlflowUnavailable` when the
  retries run out, so callers can tell an outage from an empty store;
* HTTP 401 or 403: `AuthenticationFailed` at once (retrying cannot help);
* another HTTP 4xx, or JSON that MLflow's client cannot read: `RequestFailed` at once, both a kind of
  `MlflowUnavailable` (a listing that meets it is incomplete) and an MlflowException with the status;
* HTTP 404: MLflow's own error, raised as is (no such object, or an API the server lacks: the
  caller knows which it asked for).

MLflow's client takes an empty 200 for an empty answer (`{}`), which would read as the last, empty
page of a listing; within `MlflowReader.call` the answer check is stricter (`_checked_answer`).
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote_plus, urlsplit

import requests
from mlflow.entities import Experiment, LoggedModel, Run, ViewType
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException, RestException, get_error_code
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore
from mlflow.tracking._model_registry.utils import _get_store as registry_store_of
from mlflow.tracking._tracking_service.utils import _get_store as tracking_store_of
from mlflow.utils import rest_utils
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import MlflowHostCreds

from connector.config import ConnectorConfig
from connector.errors import OperatorError, first_line
from connector.observability.metrics import METRICS
from connector.redaction import without_credentials

log = logging.getLogger("connector.mlflow_reader")

T = TypeVar("T")

# MLflow's server-side caps per page (ANCHORS: search_runs/experiments 50,000; versions 200,000;
# registered models 1,000). Defaults stay below them to keep responses a few MB at most.
# Experiments per search: one search covers up to this many (MLflow takes the ids in one IN clause),
# so an idle cycle costs the same number of requests whatever the store size, up to this many.
RUNS_PER_EXPERIMENT_BATCH = 1000
# ... but a complete listing asks for the runs of at most this many experiments per search. MLflow answers
# each page by sorting every run the search matches before it skips to the page's offset: with 200,000
# runs in one search a page of 500 took 0.87-1.36 s, with 20,000 (100 experiments) 0.76-0.81 s
# (docs/performance.md), and a listing makes hundreds of pages.
LISTING_EXPERIMENTS_PER_SEARCH = 100
PROMPT_TAG = "mlflow.prompt.is_prompt"

# MLflow's HTTP client retries each request itself (7 times with factor-2 backoff by default,
# which hides an outage for minutes); keep its retries short and do the waiting here, with logs.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class MlflowUnavailable(OperatorError):
    """MLflow did not answer a request usefully after the configured retries."""


class RequestFailed(MlflowUnavailable, MlflowException):
    """MLflow answered a request with an error that the same request would get again (an HTTP 4xx other
    than 401, 403, 404, 408 and 429), or with JSON its client cannot read. A kind of MlflowUnavailable (a
    listing that meets it is incomplete) and of MlflowException: `http_status` gives the status (None for
    an unreadable answer), `error_code` MLflow's."""

    def __init__(self, message: str, cause: BaseException) -> None:
        code = cause.error_code if isinstance(cause, MlflowException) else "INTERNAL_ERROR"
        MlflowException.__init__(self, message, error_code=ErrorCode.Value(code if code in ErrorCode.keys()
                                                                           else "INTERNAL_ERROR"))
        self.status = http_status(cause)

    def get_http_status_code(self) -> int | None:  # type: ignore[override]
        return self.status


@dataclass(frozen=True)
class ReaderSettings:
    tracking_uri: str
    registry_uri: str
    page_size: int = 500
    model_version_page_size: int = 10000
    max_requests_per_second: float | None = None
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    retry_for_seconds: float | None = None  # None: retry until it answers
    username: str | None = field(default=None, repr=False)  # given to this reader's connections only
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer`


def reader_settings(cfg: ConnectorConfig, retry_for_seconds: float | None = None) -> ReaderSettings:
    """The reader's settings from the configuration: where MLflow is, its credentials, paging, pacing."""
    c = cfg.mlflow
    return ReaderSettings(
        tracking_uri=c.resolved_tracking_uri(),
        registry_uri=c.resolved_registry_uri(),
        page_size=cfg.producer.page_size,
        model_version_page_size=cfg.producer.model_version_page_size,
        max_requests_per_second=cfg.producer.max_requests_per_second,
        retry_for_seconds=retry_for_seconds,
        username=c.username,
        password=c.password.get_secret_value() if c.password else None,
        token=c.token.get_secret_value() if c.token else None,
    )


class RateLimiter:
    """At most `rate` calls per second, spaced evenly (a token bucket of one)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            time.sleep(delay)


class ArtifactUnreadable(Exception):
    """A model version's artifact that MLflow will not serve, now or on a retry: no such file, no
    permission, a registry that is not an MLflow server over HTTP (Databricks), another HTTP 4xx."""


# A model version's artifact is read with bounded retries: a server that keeps failing it must not hold up a cycle
# or the features pass (the version is published without its signature, and read again after the next snapshot).
ARTIFACT_RETRY_SECONDS = 3.0
MODEL_VERSION_ARTIFACT_ENDPOINT = "/model-versions/get-artifact"


class AuthenticationFailed(OperatorError):
    """MLflow refused the reader's credentials (HTTP 401) or access (HTTP 403): retrying cannot help."""


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind an MLflow client error: MLflow maps every answer's status to an error code
    and back (a request that got no answer at all is an INTERNAL_ERROR, 500)."""
    return error.get_http_status_code() if isinstance(error, MlflowException) else None


def does_not_exist(error: BaseException) -> bool:
    """MLflow's own answer that the object asked for does not exist: HTTP 404 with its error code
    RESOURCE_DOES_NOT_EXIST. A 404 without it (a proxy's page for a path it does not route, or a server
    without the API) says nothing about the object."""
    return http_status(error) == 404 and getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# -- what went wrong, in one place -----------------------------------------------------------------

Fault = Literal["refused", "transient", "failed", "answer"]
TRANSIENT_STATUSES = frozenset({408, 429})  # and every status from 500 on


class UnusableAnswer(Exception):
    """A 200 whose body is no JSON at all: empty, an HTML page, or cut off. Raised by `_checked_answer`
    within `MlflowReader.call` (MLflow's client takes an empty body for an empty answer)."""

    def __init__(self, endpoint: str, body: Literal["empty", "html", "not json"]) -> None:
        super().__init__(f"{endpoint}: {body}")
        self.endpoint = endpoint
        self.body = body

    def phrase(self) -> str:
        if self.body == "html":
            return "answered an HTML page where JSON was expected (a login page of a proxy in front of MLflow?)"
        if self.body == "empty":
            return "answered an empty body where JSON was expected"
        return "answered a body that is not JSON (cut off?)"


def classify(error: BaseException, answered: bool = False) -> Fault:
    """What a failed request means, from its HTTP status and exception types (never a message's words):

    - "refused": HTTP 401 or 403;
    - "transient": no useful answer: no connection, a reset, a timeout, a body cut off (MLflow's
      client reports each as INTERNAL_ERROR, 500), HTTP 5xx, 408 or 429, a 200 with an empty, HTML
      or non-JSON body;
    - "failed": an error the same request would get again: another HTTP 4xx, or an answer that came
      (`answered`: it passed the answer check) and that MLflow's client could not read;
    - "answer": raised as is: HTTP 404 (no such object, or an API the server lacks), and an error of
      the caller's own before any answer came (a bug keeps its traceback)."""
    status = http_status(error)
    if status in (401, 403):
        return "refused"
    if isinstance(error, UnusableAnswer):
        return "transient"
    if status is not None:
        if status >= 500 or status in TRANSIENT_STATUSES:
            return "transient"
        return "answer" if status == 404 else "failed"
    if isinstance(error, (OSError, requests.exceptions.RequestException, http.client.HTTPException)):
        return "transient"  # a store other than MLflow's REST client (those are MlflowExceptions)
    return "failed" if answered else "answer"


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: causes, contexts, and exceptions among its arguments (urllib3 and
    requests nest the socket's error in their own)."""
    seen: set[int] = set()
    pending = [error]
    while pending and len(seen) < 20:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nested = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        pending += [n for n in nested if isinstance(n, BaseException)]


_NO_ANSWER: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((requests.exceptions.ChunkedEncodingError, http.client.IncompleteRead),
     "answered a body that was cut off (the connection closed mid-body)"),
    ((ConnectionRefusedError,), "is unreachable (connection refused)"),
    ((ConnectionResetError, ConnectionAbortedError, BrokenPipeError), "is unreachable (connection reset)"),
    ((socket.gaierror,), "is unreachable (host name not resolved)"),
    ((requests.exceptions.Timeout, TimeoutError), "is unreachable (timed out)"),
    ((http.client.RemoteDisconnected,), "is unreachable (connection closed without an answer)"),
    ((requests.exceptions.ConnectionError, OSError), "is unreachable (no connection)"),
)


def _no_answer(error: BaseException) -> str | None:
    """Why no whole answer came, from the exception types; None when one came."""
    causes = list(_causes(error))
    if any(isinstance(c, requests.exceptions.RetryError) for c in causes):
        return None  # HTTP error answers, retried by MLflow's client: the status says which
    return next((reason for types, reason in _NO_ANSWER if any(isinstance(c, types) for c in causes)), None)


def describe(error: BaseException) -> str:
    """A failed request in one line, to follow "MLflow at <uri> ": what MLflow answered, or why it did
    not (the messages of MLflow's client repeat the URL and whole response bodies)."""
    if isinstance(error, UnusableAnswer):
        return error.phrase()
    if isinstance(error, OperatorError):  # the reader's own errors: one line already
        return first_line(error, 300)
    reason = _no_answer(error)
    if reason is not None:
        return reason
    if any(isinstance(c, requests.exceptions.RetryError) for c in _causes(error)):
        return "answered HTTP 5xx, 408 or 429 to every attempt of its client"  # urllib3 keeps no status
    status = http_status(error)
    if isinstance(error, RestException):  # MLflow's JSON error: its message starts with its error code
        return f"answered HTTP {status} ({first_line(Exception(error.message), 150)})"
    if status is not None:
        return f"answered HTTP {status}"
    return f"answered what its client cannot read ({type(error).__name__}: {first_line(error, 150)})"


READ_FAILURES: tuple[type[Exception], ...] = (MlflowUnavailable, AuthenticationFailed, MlflowException)
"""What a read through `MlflowReader.call` can fail with, MLflow's answer or its silence, once the retries are
done: a long-running reader logs it (`failure`), backs off and tries again; it never ends the process."""


def failure(error: BaseException, uri: str) -> str:
    """One of READ_FAILURES in one line (the reader's own errors are; MLflow's 404 repeats a response body)."""
    if isinstance(error, OperatorError):
        return first_line(error, 400)
    return f"MLflow at {without_credentials(uri)} {describe(error)}"


class _Exchange:
    """One request within `MlflowReader.call`: whether an answer came that passed the answer check."""

    answered = False


_exchange: ContextVar[_Exchange | None] = ContextVar("mlflow_exchange", default=None)
_retry_limit: ContextVar[float | None] = ContextVar("mlflow_retry_limit", default=None)
_mlflow_verify = getattr(rest_utils.verify_rest_response, "__wrapped__", rest_utils.verify_rest_response)


def _checked_answer(response: requests.Response, endpoint: str, expected_status: int = 200) -> requests.Response:
    """MLflow's answer check (`rest_utils.verify_rest_response`), stricter within `MlflowReader.call`: a 200
    whose body is empty (MLflow's client takes it for `{}`, an empty page), an HTML page or not JSON raises
    `UnusableAnswer`. Other MLflow clients in the process (outside `call`) get MLflow's check unchanged."""
    exchange = _exchange.get()
    if exchange is None or expected_status != 200 or response.status_code != 200:
        return _mlflow_verify(response, endpoint, expected_status)
    content = response.content or b""
    if not content or content.isspace():
        raise UnusableAnswer(endpoint, "empty")
    if "text/html" in response.headers.get("Content-Type", "").lower() or content[:256].lstrip()[:1] == b"<":
        raise UnusableAnswer(endpoint, "html")
    try:
        checked = _mlflow_verify(response, endpoint, expected_status)
    except MlflowException:  # with status 200, MLflow raises only for a body that is not a JSON object
        raise UnusableAnswer(endpoint, "not json") from None
    exchange.answered = True
    return checked


# MLflow's call_endpoint looks the check up in rest_utils at each request: the REST stores use this one.
_checked_answer.__wrapped__ = _mlflow_verify  # type: ignore[attr-defined]
rest_utils.verify_rest_response = _checked_answer


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def host_credentials(uri: str, settings: ReaderSettings) -> MlflowHostCreds:
    """MLflow's own credentials for `uri` (its MLFLOW_TRACKING_* environment, as every MLflow client),
    with the configured username and password (basic auth) or token (bearer) on top: given to this
    connection only, never exported to the process environment, and to the registry only when it is
    on the tracking server's host (scheme, host and port)."""
    creds = get_default_host_creds(uri)
    if _same_origin(uri, settings.tracking_uri):
        if settings.username and settings.password:
            creds.username, creds.password = settings.username, settings.password
        if settings.token:
            creds.token = settings.token
    return creds


def stores(settings: ReaderSettings) -> tuple[Any, Any]:
    """The tracking and registry stores the reader calls. Over HTTP they are MLflow's REST stores, made
    here with this reader's credentials; other URIs (databricks, a local path) resolve as MLflow
    resolves them. The reader calls the stores directly, not `MlflowClient`: the MLflow 3 client adds
    a filter that excludes prompts (`tags.mlflow.prompt.is_prompt != 'true'`) to every registry
    search, and an MLflow 2.x server, whose models carry no such tag, answers it with nothing."""
    def is_http(uri: str) -> bool:
        return urlsplit(uri).scheme in ("http", "https")

    if is_http(settings.tracking_uri):
        tracking = TrackingRestStore(lambda: host_credentials(settings.tracking_uri, settings))
    else:
        tracking = tracking_store_of(settings.tracking_uri)
    if is_http(settings.registry_uri):
        registry = RegistryRestStore(lambda: host_credentials(settings.registry_uri, settings))
    else:
        registry = registry_store_of(settings.registry_uri, settings.tracking_uri)
    return tracking, registry


def is_prompt(tags: Any) -> bool:
    """A registry entry of MLflow's prompt registry (3.x keeps prompts in the model registry)."""
    if isinstance(tags, dict):
        return str(tags.get(PROMPT_TAG, "")).lower() == "true"
    return any(getattr(t, "key", None) == PROMPT_TAG and str(t.value).lower() == "true" for t in tags or [])


# -- filter strings ------------------------------------------------------------------------------
#
# MLflow reads a filter with sqlparse. A value is quoted with ' or " and is the text between its
# quotes as it stands: there is no escape (`name = 'O\'Brien'` looks for `O\'Brien`), and a value
# ending in a backslash is read as escaping its closing quote when anything follows it. A list
# (`IN (...)`) is then read with Python's `ast.literal_eval`, where a backslash *is* an escape
# (`'a\n'` is a line break, `'a\'` leaves the list "ill-formed": HTTP 400). MLflow 2.x takes lists
# for run ids only. So a value is quoted with the quote character it does not contain; a value no
# quote can hold exactly is looked for with a coarser LIKE pattern; and every answer is selected
# exactly here (MySQL's `=` and `IN` ignore case, LIKE matches more).

MAX_FILTER_URL_BYTES = 3000
"""A filter's share of a request line, URL-encoded. search_model_versions and search_registered_models
send their filter in a GET's query string, and gunicorn (MLflow 2.x's default server) refuses request
lines over 4094 bytes; the method, path, page token and ordering stay well within the other 1,094."""

_QUOTES = ("'", '"')
_NOT_IN_A_LIST = ("\\", "\n", "\r", "\x00")  # an escape, or the end of the literal, to ast.literal_eval
_LIKE_WILDCARD_FOR = ("'", '"', "\\")  # unquotable, or LIKE's escape character (PostgreSQL, MySQL)


def url_bytes(text: str) -> int:
    """The length of `text` in a URL's query string, encoded as MLflow's client (requests) encodes it."""
    return len(quote_plus(text))


def quoted(value: str, in_list: bool = False) -> str | None:
    """`value` as a filter literal MLflow reads back exactly, quoted with a quote character it does
    not contain; None if there is none (it holds both), if it ends in a backslash, or, for a list
    (`in_list`), if it holds a backslash, a line break or a NUL."""
    if value.endswith("\\") or (in_list and any(c in value for c in _NOT_IN_A_LIST)):
        return None
    for quote in _QUOTES:
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def like_pattern(value: str, budget: int = MAX_FILTER_URL_BYTES) -> str:
    """A LIKE pattern that matches `value` (and maybe more), always quotable with `'`: quotes and
    backslashes become `_` (any one character), `%` and `_` of the value match themselves among
    others. Longer than `budget` URL-encoded bytes, it is cut and ends in `%`."""
    pattern = "".join("_" if c in _LIKE_WILDCARD_FOR else c for c in value)
    if url_bytes(pattern) <= budget:
        return pattern
    used, cut = url_bytes("%"), []
    for c in pattern:
        used += url_bytes(c)
        if used > budget:
            break
        cut.append(c)
    return "".join(cut) + "%"


@dataclass(frozen=True)
class ValueSearch:
    """One filtered search for some values of a key; of MLflow's answer, only the objects whose value
    is one of `values` are kept."""

    filter_string: str
    values: frozenset[str]
    is_list: bool = False


def value_searches(key: str, values: Iterable[str], lists: bool = True,
                   budget: int = MAX_FILTER_URL_BYTES) -> list[ValueSearch]:
    """Searches that together find every object whose `key` is one of `values`, each filter within
    `budget` URL-encoded bytes: `key IN (...)` lists packed by encoded length (if `lists`); `key = `
    for a value a list cannot hold; `key LIKE` for a value no quote can hold, or too long."""
    out: list[ValueSearch] = []
    batch: list[tuple[str, str]] = []  # (value, literal) of the list being packed
    head, tail, comma = url_bytes(f"{key} IN ("), url_bytes(")"), url_bytes(", ")
    used = 0

    def single(value: str) -> ValueSearch:
        literal = quoted(value)
        if literal is not None and url_bytes(f"{key} = {literal}") <= budget:
            return ValueSearch(f"{key} = {literal}", frozenset([value]))
        prefix, end = f"{key} LIKE '", "'"
        pattern = like_pattern(value, budget - url_bytes(prefix) - url_bytes(end))
        return ValueSearch(f"{prefix}{pattern}{end}", frozenset([value]))

    def flush() -> None:
        if len(batch) == 1:  # one value: a comparison, which every server takes
            out.append(single(batch[0][0]))
        elif batch:
            out.append(ValueSearch(f"{key} IN ({', '.join(literal for _, literal in batch)})",
                                   frozenset(value for value, _ in batch), is_list=True))
        batch.clear()

    for value in sorted(set(values)):
        literal = quoted(value, in_list=True) if lists else None
        if literal is None or head + url_bytes(literal) + tail > budget:
            out.append(single(value))
            continue
        size = url_bytes(literal)
        if batch and used + comma + size + tail > budget:
            flush()
        used = used + comma + size if batch else head + size
        batch.append((value, literal))
    flush()
    return out


class MlflowReader:
    def __init__(self, settings: ReaderSettings) -> None:
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.settings = settings
        self.tracking, self.registry = stores(settings)
        self.on_wait: Callable[[], None] | None = None  # called before each wait between retries
        # Set when the process stops: a wait between retries ends at once, with MlflowUnavailable (an outage
        # must not keep a stopping connector waiting for MLflow).
        self.stopping = threading.Event()
        self.prompt_names: set[str] = set()  # prompts met among registered models: their versions are left out too
        self.limiter = RateLimiter(settings.max_requests_per_second)
        self.requests = 0
        self.requests_by_call: Counter[str] = Counter()

    # -- the retry loop --------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One MLflow request, retried with backoff while MLflow gives no useful answer (see `classify`):
        `MlflowUnavailable` when the retries run out (`retry_for_seconds`, or `retrying_for`); at once,
        `AuthenticationFailed` for HTTP 401/403 and `RequestFailed` for what the same request would get
        again; HTTP 404 is raised as MLflow's own error."""
        delay = self.settings.retry_initial_seconds
        started = time.monotonic()
        attempt = 0
        uri = without_credentials(self.settings.tracking_uri)
        while True:
            self.limiter.wait()
            self.requests += 1
            self.requests_by_call[what] += 1
            exchange = _Exchange()
            token = _exchange.set(exchange)
            try:
                result = fn(*args, **kwargs)
                METRICS.mlflow_requests.labels("ok").inc()
                if attempt:
                    log.info("MLflow answers again (%s) after %.0f s", what, time.monotonic() - started)
                return result
            except Exception as e:
                fault = classify(e, exchange.answered)
                METRICS.mlflow_requests.labels("retried" if fault == "transient" else "failed").inc()
                if fault == "refused":
                    raise self._refused(what, http_status(e)) from None  # type: ignore[arg-type]
                if fault == "answer":
                    raise
                if fault == "failed":
                    raise RequestFailed(f"MLflow at {uri} {describe(e)} for {what}", e) from e
                attempt += 1
                waited = time.monotonic() - started
                limit = self._retry_for()
                if limit is not None and waited >= limit:
                    raise MlflowUnavailable(f"MLflow at {uri} did not answer {what} usefully for {waited:.0f} s (last "
                                            f"attempt: it {describe(e)})") from None
                log.warning("MLflow at %s %s for %s; retry %d in %.3g s", uri, describe(e), what, attempt, delay)
                if self.on_wait is not None:  # waiting on an outage is progress for the liveness probe
                    self.on_wait()
                if self.stopping.wait(delay):
                    raise MlflowUnavailable(
                        f"MLflow at {uri} {describe(e)} for {what}; not retried: stopping") from None
                delay = min(delay * 2, self.settings.retry_max_seconds)
            finally:
                _exchange.reset(token)

    def _retry_for(self) -> float | None:
        limit, within = self.settings.retry_for_seconds, _retry_limit.get()
        return within if limit is None else limit if within is None else min(limit, within)

    @contextmanager
    def retrying_for(self, seconds: float) -> Iterator[None]:
        """Within it (in this thread), each request is retried for at most `seconds` (or the configured
        limit, if shorter): for targeted reads, which must not hold up the rest while MLflow fails them."""
        token = _retry_limit.set(seconds)
        try:
            yield
        finally:
            _retry_limit.reset(token)

    def _refused(self, what: str, status: int) -> AuthenticationFailed:
        s = self.settings
        given = ("username and password" if s.username else "token" if s.token else
                 "no credentials (source.config.username and password, or token)")
        if status == 401:
            return AuthenticationFailed(f"MLflow at {s.tracking_uri} refused the credentials ({what}: HTTP 401 "
                                        f"Unauthorized; the configuration gives {given})")
        return AuthenticationFailed(f"MLflow at {s.tracking_uri} refused access ({what}: HTTP 403 Forbidden): the "
                                    "user needs READ permission on every experiment and registered model")

    def _pages(self, what: str, search: Callable[..., Any], max_results: int, first_page: int | None = None,
               prefetch: bool = False, **kwargs: Any) -> Iterator[list[Any]]:
        """A search, a page at a time. `first_page`: a smaller first page (the next ones ten times as
        large, up to `max_results`), for reads newest first that usually stop early, or to hand a
        listing's first items on sooner (MLflow's page tokens are offsets, so pages may differ in
        size). `prefetch`: request the next page while the caller works on this one (for listings
        read to their end: a read that stops early would waste the request)."""
        def fetch(token: str | None, size: int) -> Any:
            return self.call(what, search, page_token=token, max_results=size, **kwargs)

        token, size = None, min(first_page or max_results, max_results)
        with ThreadPoolExecutor(1, thread_name_prefix="mlflow-prefetch") as pool:  # a thread only once used
            pending = pool.submit(copy_context().run, fetch, token, size) if prefetch else None
            while True:
                page = pending.result() if pending is not None else fetch(token, size)
                token, size = page.token, min(size * 10, max_results)
                pending = pool.submit(copy_context().run, fetch, token, size) if prefetch and token else None
                yield list(page)
                if not token:
                    return

    # -- listings --------------------------------------------------------------------------------

    def check(self) -> None:
        """One cheap request; raises MlflowUnavailable when MLflow does not answer."""
        self.call("a reachability check", self.tracking.search_experiments, max_results=1)

    def experiments(self) -> Iterator[list[Experiment]]:
        """Every experiment, deleted ones included, a page at a time."""
        return self._pages("search_experiments", self.tracking.search_experiments,
                           view_type=ViewType.ALL, max_results=self.settings.page_size)

    def runs(self, experiment_ids: Sequence[str], filter_string: str = "", order_by: list[str] | None = None,
             first_page: int | None = None, prefetch: bool = False) -> Iterator[list[Run]]:
        """Runs of many experiments at once (deleted runs included), a page at a time. `prefetch`: a
        complete listing, read to its end, with fewer experiments per search (LISTING_EXPERIMENTS_PER_SEARCH)."""
        ids = list(experiment_ids)
        per_search = LISTING_EXPERIMENTS_PER_SEARCH if prefetch else RUNS_PER_EXPERIMENT_BATCH
        for start in range(0, len(ids), per_search):
            yield from self._pages(
                "search_runs", self.tracking.search_runs,
                experiment_ids=ids[start:start + per_search], filter_string=filter_string,
                run_view_type=ViewType.ALL, max_results=self.settings.page_size, order_by=order_by,
                first_page=first_page, prefetch=prefetch,
            )

    # -- searches for given values (filter strings: see value_searches) ---------------------------

    # Searches whose server refused a list of values (HTTP 400; MLflow 2.x takes lists for run ids
    # only): asked one value at a time from then on.
    lists_refused: frozenset[str] = frozenset()

    def _by_values(self, what: str, search: Callable[[str], Iterator[list[T]]], key: str, values: Iterable[str],
                   value_of: Callable[[T], str]) -> Iterator[list[T]]:
        """Pages of `search(filter_string)` for every object whose `key` is one of `values`, and no
        other object (MLflow's answer is selected exactly: see value_searches)."""
        scope = f"{what} {key}"
        pending = value_searches(key, values, lists=scope not in self.lists_refused)
        while pending:
            one = pending.pop(0)
            answered = False
            try:
                for page in search(one.filter_string):
                    answered = True
                    yield [item for item in page if value_of(item) in one.values]
            except MlflowException as e:
                if not one.is_list or answered or http_status(e) != 400:
                    raise
                self.lists_refused = self.lists_refused | {scope}
                log.info("MLflow at %s takes no list in %s filters (%s); asking for one %s at a time",
                         without_credentials(self.settings.tracking_uri), what, first_line(e, 120), key)
                pending = value_searches(key, one.values, lists=False) + pending

    def runs_by_id(self, experiment_ids: Sequence[str], run_ids: Iterable[str]) -> list[Run]:
        """The runs with these ids among the experiments' (deleted ones included); unknown ids are left out."""
        found: list[Run] = []
        for page in self._by_values("search_runs", lambda f: self.runs(experiment_ids, filter_string=f),
                                    "attributes.run_id", run_ids, lambda r: r.info.run_id):
            found.extend(page)
        return found

    def registered_models_named(self, names: Iterable[str]) -> Iterator[list[RegisteredModel]]:
        """The registered models of these names (prompts left out), a page at a time."""
        return self._by_values("search_registered_models", lambda f: self.registered_models(filter_string=f),
                               "name", names, lambda m: m.name)

    def model_versions_of(self, names: Iterable[str]) -> Iterator[list[ModelVersion]]:
        """Every version of the registered models of these names, a page at a time."""
        return self._by_values("search_model_versions", lambda f: self.model_versions(filter_string=f),
                               "name", names, lambda v: v.name)

    def model_versions_of_runs(self, run_ids: Iterable[str]) -> Iterator[list[ModelVersion]]:
        """Every model version registered from these runs, a page at a time."""
        return self._by_values("search_model_versions", lambda f: self.model_versions(filter_string=f),
                               "run_id", run_ids, lambda v: v.run_id or "")

    def model_version_file(self, name: str, version: str, path: str = "MLmodel") -> str:
        """One file of a model version's artifacts, as text: MLflow's own `/model-versions/get-artifact`
        route (the one its UI uses), which resolves the version's source on the server whatever it is
        (`models:/m-...` LoggedModels of MLflow 3, `runs:/...`, a path in the artifact store), on 2.x and
        3.x servers alike. One GET with this reader's credentials for the registry, paced and retried
        like every request (for ARTIFACT_RETRY_SECONDS at most: MlflowUnavailable after them);
        ArtifactUnreadable when MLflow refuses or lacks it (HTTP 401, 403, 404, another 4xx) or the
        registry is not an MLflow server over HTTP."""
        uri = self.settings.registry_uri
        if urlsplit(uri).scheme not in ("http", "https"):
            raise ArtifactUnreadable(f"the registry {without_credentials(uri)} is not an MLflow server over HTTP: "
                                     "its artifacts are not read")
        creds = host_credentials(uri, self.settings)
        params = {"name": name, "version": version, "path": path}
        last: list[int] = []  # the status of each answer

        def fetch() -> requests.Response:
            response = rest_utils.http_request(creds, MODEL_VERSION_ARTIFACT_ENDPOINT, "GET", params=params,
                                               max_retries=0, raise_on_status=False)
            status = response.status_code
            last.append(status)
            if status >= 500 or status in TRANSIENT_STATUSES:  # retried by `call`, as any request
                raise MlflowException(f"HTTP {status}", error_code=get_error_code(status))
            return response

        try:
            with self.retrying_for(ARTIFACT_RETRY_SECONDS):
                response = self.call("model version artifact", fetch)
        except MlflowUnavailable:
            if last and last[-1] == 500:
                # MLflow's own error page for an artifact store it cannot read for this version (a bucket without
                # credentials, a scheme it has no client for): the answer of every retry, not an outage.
                raise ArtifactUnreadable(f"MLflow at {without_credentials(uri)} answered HTTP 500 to each of "
                                         f"{len(last)} requests for {path} (its artifact store cannot serve this "
                                         "version's source)") from None
            raise
        if response.status_code != 200:
            reasons = {401: "refused the credentials", 403: "refused access", 404: "has no such file"}
            raise ArtifactUnreadable(f"MLflow at {without_credentials(uri)} "
                                     f"{reasons.get(response.status_code, 'refused the request')} "
                                     f"(HTTP {response.status_code} for {path})")
        return response.content.decode("utf-8", errors="replace")

    def registered_models(self, filter_string: str | None = None, order_by: list[str] | None = None,
                          first_page: int | None = None) -> Iterator[list[RegisteredModel]]:
        """Registered models, prompts left out (MLflow 3 keeps its prompt registry among them)."""
        for page in self._pages("search_registered_models", self.registry.search_registered_models,
                                filter_string=filter_string, max_results=min(self.settings.page_size, 1000),
                                order_by=order_by, first_page=first_page):
            for m in page:
                if is_prompt(m.tags):
                    self.prompt_names.add(m.name)
            yield [m for m in page if m.name not in self.prompt_names]

    def logged_models(self, experiment_ids: Sequence[str], newest_first: bool = False,
                      first_page: int | None = None) -> Iterator[list[LoggedModel]]:
        """MLflow 3 LoggedModels of the experiments; none on servers without the API."""
        ids = list(experiment_ids)
        order = [{"field_name": "last_updated_timestamp", "ascending": False}] if newest_first else None
        for start in range(0, len(ids), RUNS_PER_EXPERIMENT_BATCH):
            try:
                yield from self._pages("search_logged_models", self.tracking.search_logged_models,
                                       experiment_ids=ids[start:start + RUNS_PER_EXPERIMENT_BATCH],
                                       max_results=min(self.settings.page_size, 100), order_by=order,
                                       first_page=first_page)
            except MlflowException as e:
                if http_status(e) == 404:  # a server without LoggedModels (MLflow 2.x)
                    return
                raise

    def model_versions(self, filter_string: str | None = None, order_by: list[str] | None = None,
                       first_page: int | None = None) -> Iterator[list[ModelVersion]]:
        """Model versions, prompt versions left out."""
        for page in self._pages("search_model_versions", self.registry.search_model_versions,
                                filter_string=filter_string, max_results=self.settings.model_version_page_size,
                                order_by=order_by, first_page=first_page):
            yield [v for v in page if not is_prompt(v.tags) and v.name not in self.prompt_names]
