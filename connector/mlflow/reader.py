"""MLflow edge: bulk, paged reads of the tracking server and the model registry.

Every listing is a paged search (no call per object). Transient failures (connection refused,
timeouts, 5xx) are retried with exponential backoff and one log line per attempt; MLflow's own
HTTP layer already honours 429 with Retry-After. A listing that still fails raises
`MlflowUnavailable`, so callers can tell an outage from an empty store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mlflow.entities import Experiment, LoggedModel, Run, ViewType
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore
from mlflow.tracking._model_registry.utils import _get_store as registry_store_of
from mlflow.tracking._tracking_service.utils import _get_store as tracking_store_of
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import MlflowHostCreds

from connector.config import ConnectorConfig
from connector.errors import OperatorError, first_line

log = logging.getLogger("connector.mlflow_reader")

T = TypeVar("T")

# MLflow's server-side caps per page (ANCHORS: search_runs/experiments 50,000; versions 200,000;
# registered models 1,000). Defaults stay below them to keep responses a few MB at most.
# Experiments per search: one search covers up to this many (MLflow takes the ids in one IN clause),
# so an idle cycle costs the same number of requests whatever the store size, up to this many.
RUNS_PER_EXPERIMENT_BATCH = 1000
PROMPT_TAG = "mlflow.prompt.is_prompt"

# MLflow's HTTP client retries each request itself (7 times with factor-2 backoff by default,
# which hides an outage for minutes); keep its retries short and do the waiting here, with logs.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class MlflowUnavailable(OperatorError):
    """MLflow did not answer a listing after the configured retries."""


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


class AuthenticationFailed(OperatorError):
    """MLflow refused the reader's credentials (HTTP 401) or access (HTTP 403): retrying cannot help."""


def http_status(error: Exception) -> int | None:
    """The HTTP status behind an MLflow client error: MLflow maps every answer's status to an error code
    and back (a request that got no answer at all is an INTERNAL_ERROR, 500)."""
    return error.get_http_status_code() if isinstance(error, MlflowException) else None


def _is_transient(error: Exception) -> bool:
    status = http_status(error)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(error, (ConnectionError, TimeoutError, OSError))


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


class MlflowReader:
    def __init__(self, settings: ReaderSettings) -> None:
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.settings = settings
        self.tracking, self.registry = stores(settings)
        self.prompt_names: set[str] = set()  # prompts met among registered models: their versions are left out too
        self.limiter = RateLimiter(settings.max_requests_per_second)
        self.requests = 0
        self.requests_by_call: Counter[str] = Counter()

    # -- the retry loop --------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One MLflow request, retried with backoff while MLflow is unreachable."""
        delay = self.settings.retry_initial_seconds
        started = time.monotonic()
        attempt = 0
        while True:
            self.limiter.wait()
            self.requests += 1
            self.requests_by_call[what] += 1
            try:
                result = fn(*args, **kwargs)
                if attempt:
                    log.info("MLflow answers again (%s) after %.0f s", what, time.monotonic() - started)
                return result
            except Exception as e:
                if http_status(e) in (401, 403):
                    raise self._refused(what, http_status(e)) from None  # type: ignore[arg-type]
                if not _is_transient(e):
                    raise
                attempt += 1
                waited = time.monotonic() - started
                limit = self.settings.retry_for_seconds
                if limit is not None and waited >= limit:
                    raise MlflowUnavailable(
                        f"MLflow at {self.settings.tracking_uri} did not answer {what} for {waited:.0f} s: "
                        f"{first_line(e, 200)}") from None
                log.warning("MLflow at %s unreachable (%s: %s); retry %d in %.0f s", self.settings.tracking_uri, what,
                            _reason(e), attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)

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
            pending = pool.submit(fetch, token, size) if prefetch else None
            while True:
                page = pending.result() if pending is not None else fetch(token, size)
                token, size = page.token, min(size * 10, max_results)
                pending = pool.submit(fetch, token, size) if prefetch and token else None
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
        """Runs of many experiments at once (deleted runs included), a page at a time."""
        ids = list(experiment_ids)
        for start in range(0, len(ids), RUNS_PER_EXPERIMENT_BATCH):
            yield from self._pages(
                "search_runs", self.tracking.search_runs,
                experiment_ids=ids[start:start + RUNS_PER_EXPERIMENT_BATCH], filter_string=filter_string,
                run_view_type=ViewType.ALL, max_results=self.settings.page_size, order_by=order_by,
                first_page=first_page, prefetch=prefetch,
            )

    def runs_by_id(self, experiment_ids: Sequence[str], run_ids: Sequence[str]) -> list[Run]:
        found: list[Run] = []
        ids = list(dict.fromkeys(run_ids))
        for start in range(0, len(ids), 100):
            quoted = ", ".join(f"'{r}'" for r in ids[start:start + 100])
            for page in self.runs(experiment_ids, filter_string=f"attributes.run_id IN ({quoted})"):
                found.extend(page)
        return found

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



def _reason(error: Exception) -> str:
    """The cause of a failed request in a few words (MLflow's own message repeats the whole URL)."""
    text = str(error)
    for cause in ("Connection refused", "timed out", "Name or service not known", "Connection reset",
                  "Remote end closed connection", "429", "502", "503", "504", "500"):
        if cause in text:
            return {"429": "HTTP 429 Too Many Requests", "500": "HTTP 500", "502": "HTTP 502", "503": "HTTP 503",
                    "504": "HTTP 504"}.get(cause, cause)
    return first_line(error, 200)
