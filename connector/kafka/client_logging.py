"""Kafka clients' own reports, made readable: librdkafka's log lines with repeats suppressed, and
an error callback that says in the connector's words when Kafka is unreachable or refuses the
connection's security settings.

librdkafka reports a wrong password, a SASL mechanism the broker does not offer and a TLS handshake
that fails as non-fatal errors and retries forever: `security_problem` recognises them, a
`ConnectionProblems` keeps the latest per connection (so that a start-up check can say which instead
of "no broker answers"), and `explain` words them with the bootstrap address and the `kafka.*` field
to check. Only librdkafka's own texts and setting *names* are used: never a setting's value but the
SASL user name and the mechanism.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import KafkaError

log = logging.getLogger("connector.kafka")


class RepeatFilter(logging.Filter):
    """One line per kind of librdkafka message per window, not one per reconnect attempt.

    While a broker is down librdkafka logs every failed connection attempt of every client
    (several per second); the first of a kind passes, the repeats within `window` seconds are
    counted, and the next one after the window says how many were suppressed."""

    _VARIABLE = re.compile(r"rdkafka#[a-z]+-\d+|\d+")

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._VARIABLE.sub("#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            first, suppressed = self._seen.get(kind, (0.0, 0))
            if now - first < self.window:
                self._seen[kind] = (first, suppressed + 1)
                return False
            self._seen[kind] = (now, 0)
            if len(self._seen) > 1000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like it in the last {self.window:.0f} s)"
            record.args = None
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger of librdkafka's own messages, with repeats suppressed (once per process)."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


# -- security problems ------------------------------------------------------------------------------

ProblemKind = Literal["authentication", "mechanism", "tls"]

_BROKER_PREFIX = re.compile(r"^\S+://\S+?/(?:bootstrap|\d+): ")  # "sasl_ssl://host:9093/bootstrap: "
_STATE_SUFFIX = re.compile(r"\s*\(after \d+ms in state \w+\)\s*$")
_OPENSSL_CODE = re.compile(r"error:[0-9A-Fa-f]+:[^:]*::?")  # "error:0A000086:SSL routines::"
_OFFERED = re.compile(r"supported mechanisms: ([A-Z0-9_,\- ]+)")


@dataclass(frozen=True)
class SecurityProblem:
    """A connection refused for its security settings, as librdkafka reported it."""

    kind: ProblemKind
    detail: str  # librdkafka's words, without the broker prefix and the state suffix
    offered: tuple[str, ...] = ()  # kind "mechanism": what the broker offers, when it said


def _detail(text: str) -> str:
    return _STATE_SUFFIX.sub("", _BROKER_PREFIX.sub("", text.strip()))


def security_problem(error: KafkaError) -> SecurityProblem | None:
    """The security problem an error reports (wrong credentials, a mechanism the broker does not
    offer, a failed TLS handshake), else None. Pure."""
    text = error.str() or ""
    code = error.code()
    detail = _detail(text)
    offered = _OFFERED.search(text)
    if offered or "Unsupported SASL mechanism" in text or code == KafkaError.UNSUPPORTED_SASL_MECHANISM:
        names = tuple(m.strip() for m in offered.group(1).split(",") if m.strip()) if offered else ()
        return SecurityProblem("mechanism", detail, names)
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return SecurityProblem("authentication", detail.removeprefix("SASL authentication error: "))
    if code == KafkaError._SSL or "SSL handshake failed" in text or "SSL routines" in text:
        tls = _OPENSSL_CODE.sub("", detail.removeprefix("SSL handshake failed: "))
        tls = tls.split(", verify that ssl.ca.location")[0].removeprefix("Disconnected: ")
        return SecurityProblem("tls", tls)
    return None


def _mechanism(settings: Mapping[str, Any]) -> str:
    return str(settings.get("sasl.mechanism") or settings.get("sasl.mechanisms") or "GSSAPI").upper()


def _credential_fields(mechanism: str) -> tuple[str, ...]:
    if mechanism == "OAUTHBEARER":
        return ("sasl.oauthbearer.*",)
    if mechanism == "GSSAPI":
        return ("sasl.kerberos.*",)
    return ("sasl.username", "sasl.password")


def explain(problem: SecurityProblem, bootstrap: str, settings: Mapping[str, Any],
            origins: Mapping[str, str] | None = None) -> str:
    """One line: what failed, at which bootstrap address, and the `kafka.*` field(s) to check. `settings`
    are the connection's librdkafka settings; `origins` says which section each came from (default
    `kafka.connection_config`). No setting's value is shown but the mechanism and the SASL user. Pure."""
    origins = origins or {}

    def field(key: str) -> str:
        section = origins.get(key) or origins.get("security.protocol") or "kafka.connection_config"
        return f"{section}.{key}"

    mechanism = _mechanism(settings)
    if problem.kind == "mechanism":
        offers = f"it offers {', '.join(problem.offered)}" if problem.offered else f"librdkafka: {problem.detail}"
        return (f"{field('sasl.mechanism')}: SASL mechanism {mechanism} is not offered by Kafka at {bootstrap} "
                f"({offers}); check {field('sasl.mechanism')}")
    if problem.kind == "authentication":
        fields = _credential_fields(mechanism)
        user = settings.get("sasl.username")
        who = f", user {user!r}" if user and "sasl.username" in fields else ""
        check = " and ".join(field(f) for f in fields)
        return (f"{field(fields[-1])}: authentication failed (SASL {mechanism}{who}) at Kafka {bootstrap}; "
                f"check {check} (librdkafka: {problem.detail})")
    if "certificate" in problem.detail.lower():
        ca = settings.get("ssl.ca.location")
        where = "" if ca else " (not set: the system's CA certificates are used)"
        return (f"{field('ssl.ca.location')}: TLS handshake failed ({problem.detail}) with Kafka at {bootstrap}; "
                f"check {field('ssl.ca.location')}{where}: it must hold the CA that signed the broker's certificate")
    return (f"{field('security.protocol')}: TLS handshake failed ({problem.detail}) with Kafka at {bootstrap}; "
            f"check {field('security.protocol')} and kafka.bootstrap_servers: is that address a TLS listener?")


class ConnectionProblems:
    """The security problems the clients of one connection reported: the latest is kept (thread-safe;
    error callbacks run in whichever thread polls the client)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: SecurityProblem | None = None
        self.count = 0

    def record(self, problem: SecurityProblem) -> None:
        with self._lock:
            self._latest = problem
            self.count += 1

    def latest(self) -> SecurityProblem | None:
        with self._lock:
            return self._latest


class KafkaErrors:
    """error_cb of a client: Kafka being unreachable, or refusing the connection's security settings,
    is said once, in the connector's words, and again only if it lasts (librdkafka reports it every
    few seconds while it does). Security problems are also recorded in `problems`, worded by `words`
    (default: `explain` without the connection's settings)."""

    def __init__(self, client: str, bootstrap: str, repeat_seconds: float = 60.0,
                 problems: ConnectionProblems | None = None,
                 words: Callable[[SecurityProblem], str] | None = None) -> None:
        self.client = client
        self.bootstrap = bootstrap
        self.repeat_seconds = repeat_seconds
        self.problems = problems
        self.words = words or (lambda problem: explain(problem, bootstrap, {}))
        self._last: dict[int | str, float] = {}

    def __call__(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("%s: fatal Kafka error: %s", self.client, error.str())
            return
        problem = security_problem(error)
        if problem is not None and self.problems is not None:
            self.problems.record(problem)
        now = time.monotonic()
        kind: int | str = problem.kind if problem is not None else error.code()
        if now - self._last.get(kind, -self.repeat_seconds) < self.repeat_seconds:
            return
        self._last[kind] = now
        if problem is not None:
            log.warning("%s: %s; librdkafka keeps retrying", self.client, self.words(problem))
        else:
            log.warning("%s: Kafka at %s: %s; librdkafka keeps retrying", self.client, self.bootstrap, error.str())
