"""Authentication of MLflow webhook deliveries (connector/mlflow/webhooks.py `Verifier`, `sign`), pure:
headers and bodies in, a Delivery or a Rejected out, on a clock the test sets. The HTTP receiver
around it is tested over real HTTP in tests/integration/test_webhooks.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from connector.mlflow import webhooks
from connector.mlflow.webhooks import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    Rejected,
    Verifier,
    sign,
)

SECRET = "whsec-unit-7a1b"
NOW = 1_795_793_706  # Unix seconds
MAX_AGE = 300.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def independent_sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's scheme (mlflow/webhooks/delivery.py), written out apart from the code under test."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def body(entity: str = "model_version_tag", action: str = "set", name: object = "churn model") -> bytes:
    data = {"version": "3", "key": "k", "value": "v"} if name is None else {"name": name, "version": "3"}
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-27T10:00:00+00:00",
                       "data": data}).encode()


def headers(content: bytes, delivery_id: str = "5b2c6f7e-0d55-4b5e-9f0b-1c7a3e2d9a10", timestamp: int | str = NOW,
            secret: str = SECRET) -> dict[str, str]:
    ts = str(timestamp)
    return {DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: ts,
            SIGNATURE_HEADER: independent_sign(secret, delivery_id, ts, content)}


def verifier(clock: Clock | None = None) -> Verifier:
    return Verifier(SECRET, MAX_AGE, clock or Clock())


def rejected(v: Verifier, h: dict[str, str], content: bytes) -> Rejected:
    with pytest.raises(Rejected) as raised:
        v.verify(h, content)
    assert str(raised.value) == raised.value.reason
    return raised.value


# ---- sign ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delivery_id, timestamp, content", [
    ("5b2c6f7e-0d55-4b5e-9f0b-1c7a3e2d9a10", "1795793706", b'{"entity": "registered_model"}'),
    ("id", "0", b""),
])
def test_sign_is_mlflows_hmac_sha256_scheme(delivery_id: str, timestamp: str, content: bytes) -> None:
    signature = sign(SECRET, delivery_id, timestamp, content)
    assert signature == independent_sign(SECRET, delivery_id, timestamp, content)
    assert signature.startswith("v1,") and len(base64.b64decode(signature[3:])) == 32


def test_sign_depends_on_every_part() -> None:
    base = sign(SECRET, "id", "1", b"x")
    assert len({base, sign("other", "id", "1", b"x"), sign(SECRET, "id2", "1", b"x"), sign(SECRET, "id", "2", b"x"),
                sign(SECRET, "id", "1", b"y")}) == 5


def test_a_delivery_signed_by_sign_is_accepted() -> None:
    content = body()
    h = {DELIVERY_ID_HEADER: "d1", TIMESTAMP_HEADER: str(NOW), SIGNATURE_HEADER: sign(SECRET, "d1", str(NOW), content)}
    assert verifier().verify(h, content) == Delivery("d1", "model_version_tag.set", "churn model")


# ---- authentic deliveries -----------------------------------------------------------------------


@pytest.mark.parametrize("event", webhooks.EVENTS)
def test_authentic_delivery_of_a_followed_event_names_its_model(event: str) -> None:
    entity, action = event.rsplit(".", 1)
    content = body(entity, action, name="team/churn model")
    delivery = verifier().verify(headers(content, "d1"), content)
    assert delivery == Delivery("d1", event, "team/churn model")


def test_authentic_delivery_of_another_event_is_accepted_without_a_model() -> None:
    content = body("webhook", "test", name=None)
    delivery = verifier().verify(headers(content, "d1"), content)
    assert delivery == Delivery("d1", "webhook.test", None)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_one_matching_signature_among_several_is_enough(position: int) -> None:
    """Standard Webhooks: several space-separated signatures (e.g. during a secret rotation)."""
    content = body()
    h = headers(content, "d1")
    others = [independent_sign(f"old secret {i}", "d1", str(NOW), content) for i in range(2)]
    h[SIGNATURE_HEADER] = " ".join([*others[:position], h[SIGNATURE_HEADER], *others[position:]])
    assert verifier().verify(h, content).model_name == "churn model"
    h[SIGNATURE_HEADER] = " ".join(others)
    assert rejected(verifier(), h, content).status == 401


@pytest.mark.parametrize("offset", [-MAX_AGE, -1, 0, 1, MAX_AGE])
def test_timestamps_within_max_age_either_way_are_fresh(offset: float) -> None:
    content = body()
    assert verifier().verify(headers(content, timestamp=int(NOW + offset)), content).event == "model_version_tag.set"


# ---- refused deliveries -------------------------------------------------------------------------


def test_missing_signature_is_unauthorised() -> None:
    content = body()
    h = headers(content)
    del h[SIGNATURE_HEADER]
    error = rejected(verifier(), h, content)
    assert (error.status, error.reason) == (401, f"no {SIGNATURE_HEADER} header")
    h[SIGNATURE_HEADER] = ""
    assert rejected(verifier(), h, content).status == 401


@pytest.mark.parametrize("missing", [DELIVERY_ID_HEADER, TIMESTAMP_HEADER])
def test_missing_delivery_id_or_timestamp_is_a_bad_request(missing: str) -> None:
    content = body()
    h = headers(content)
    del h[missing]
    error = rejected(verifier(), h, content)
    assert (error.status, error.reason) == (400, f"no {missing} header")


@pytest.mark.parametrize("tamper", ["secret", "body", "delivery id", "timestamp", "version", "garbage"])
def test_a_signature_that_does_not_match_is_unauthorised(tamper: str) -> None:
    content = body()
    h = headers(content, "d1", secret="another secret" if tamper == "secret" else SECRET)
    if tamper == "body":
        content = body(name="another model")
    elif tamper == "delivery id":
        h[DELIVERY_ID_HEADER] = "d2"
    elif tamper == "timestamp":
        h[TIMESTAMP_HEADER] = str(NOW + 1)
    elif tamper == "version":
        h[SIGNATURE_HEADER] = "v2," + h[SIGNATURE_HEADER].split(",", 1)[1]
    elif tamper == "garbage":
        h[SIGNATURE_HEADER] = "v1,not base64 at all é"
    error = rejected(verifier(), h, content)
    assert (error.status, error.reason) == (401, "signature does not match")


def test_a_signed_timestamp_that_is_not_unix_seconds_is_a_bad_request() -> None:
    content = body()
    error = rejected(verifier(), headers(content, timestamp="2026-11-27T10:00:00Z"), content)
    assert error.status == 400 and TIMESTAMP_HEADER in error.reason


def test_a_stale_delivery_is_refused() -> None:
    content = body()
    error = rejected(verifier(), headers(content, timestamp=int(NOW - MAX_AGE - 1)), content)
    assert error.status == 400
    assert error.reason == "timestamp 301 s in the past (accepted: 300 s)"


def test_a_delivery_from_the_future_beyond_max_age_is_refused() -> None:
    content = body()
    error = rejected(verifier(), headers(content, timestamp=int(NOW + MAX_AGE + 60)), content)
    assert error.status == 400
    assert error.reason == "timestamp 360 s in the future (accepted: 300 s)"


def test_freshness_follows_the_clock() -> None:
    clock = Clock()
    v = verifier(clock)
    content = body()
    h = headers(content, "d1")
    clock.now = NOW + MAX_AGE + 1  # the same delivery, arriving late
    assert "in the past" in rejected(v, h, content).reason


@pytest.mark.parametrize("content, why", [
    (b"not json", "body is not JSON"),
    (b"\xff\xfe{", "body is not JSON"),
    (b"[1, 2]", "body has no `data` object"),
    (json.dumps({"entity": "registered_model", "action": "created", "data": "x"}).encode(),
     "body has no `data` object"),
    (body("registered_model", "created", name=None), "registered_model.created without data.name"),
    (body("registered_model", "created", name=""), "registered_model.created without data.name"),
    (body("registered_model", "created", name=7), "registered_model.created without data.name"),
])
def test_an_authentic_body_the_connector_cannot_read_is_a_bad_request(content: bytes, why: str) -> None:
    error = rejected(verifier(), headers(content), content)
    assert (error.status, error.reason) == (400, why)


# ---- replays ------------------------------------------------------------------------------------


def test_a_replayed_delivery_is_refused() -> None:
    clock = Clock()
    v = verifier(clock)
    content = body()
    h = headers(content, "d1")
    v.verify(h, content)
    error = rejected(v, h, content)
    assert (error.status, error.reason) == (409, "delivery id already accepted (replay)")
    clock.now = NOW + MAX_AGE - 1  # still fresh, still a replay
    assert rejected(v, h, content).status == 409
    assert v.verify(headers(content, "d2"), content).delivery_id == "d2"  # other deliveries go through


def test_a_replay_of_an_ignored_event_is_refused_too() -> None:
    v = verifier()
    content = body("webhook", "test", name=None)
    v.verify(headers(content, "d1"), content)
    assert rejected(v, headers(content, "d1"), content).status == 409


def test_a_delivery_id_reused_with_another_signed_body_is_a_replay() -> None:
    v = verifier()
    v.verify(headers(body(), "d1"), body())
    other = body(name="another model")
    assert rejected(v, headers(other, "d1", timestamp=NOW + 1), other).status == 409


def test_a_refused_delivery_does_not_use_up_its_id() -> None:
    v = verifier()
    bad = b"not json"
    assert rejected(v, headers(bad, "d1"), bad).status == 400
    assert rejected(v, headers(bad, "d2", timestamp=NOW - 1000), bad).status == 400
    good = body()
    assert v.verify(headers(good, "d1"), good).delivery_id == "d1"
    assert v.verify(headers(good, "d2"), good).delivery_id == "d2"


def test_a_replay_after_max_age_is_refused_as_stale() -> None:
    clock = Clock()
    v = verifier(clock)
    content = body()
    h = headers(content, "d1")
    v.verify(h, content)
    clock.now = NOW + MAX_AGE + 1
    error = rejected(v, h, content)
    assert error.status == 400 and "in the past" in error.reason


def test_delivery_ids_are_forgotten_once_stale() -> None:
    clock = Clock()
    v = verifier(clock)
    for i in range(5):
        content = body()
        v.verify(headers(content, f"old-{i}"), content)
    clock.now = NOW + MAX_AGE + 1
    content = body()
    v.verify(headers(content, "new", timestamp=int(clock.now)), content)
    assert list(v._accepted) == ["new"]


def test_remembered_delivery_ids_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "MAX_REMEMBERED_DELIVERIES", 3)
    v = verifier()
    content = body()
    for i in range(10):
        v.verify(headers(content, f"d{i}"), content)
        assert len(v._accepted) <= 3
    assert list(v._accepted) == ["d7", "d8", "d9"]  # the oldest make room, though still fresh
    assert rejected(v, headers(content, "d9"), content).status == 409  # the newest is still refused
    # The price of the bound: a fresh delivery pushed out of memory is no longer known.
    assert v.verify(headers(content, "d0"), content).delivery_id == "d0"
    assert len(v._accepted) <= 3


def test_a_full_memory_still_refuses_a_replay_of_its_oldest_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "MAX_REMEMBERED_DELIVERIES", 3)
    v = verifier()
    content = body()
    for i in range(3):
        v.verify(headers(content, f"d{i}"), content)
    assert list(v._accepted) == ["d0", "d1", "d2"]
    rejected(v, headers(content, "d0"), content)


def test_a_replay_exactly_max_age_later_is_refused() -> None:
    clock = Clock()
    v = verifier(clock)
    content = body()
    h = headers(content, "d1")
    v.verify(h, content)
    clock.now = NOW + MAX_AGE
    rejected(v, h, content)


# ---- before the body: check_headers ---------------------------------------------------------------


def test_headers_of_an_authentic_delivery_pass_before_the_body_is_known() -> None:
    h = headers(body(), "d1")
    verifier().check_headers(h)  # the signature is only well-formed here: whether it matches needs the body
    v = verifier()
    v.check_headers(headers(b"another body", "d1"))
    assert not v._accepted  # nothing is remembered before the whole delivery is verified


@pytest.mark.parametrize("header, value, status, reason", [
    (SIGNATURE_HEADER, None, 401, f"no {SIGNATURE_HEADER} header"),
    (DELIVERY_ID_HEADER, None, 400, f"no {DELIVERY_ID_HEADER} header"),
    (TIMESTAMP_HEADER, None, 400, f"no {TIMESTAMP_HEADER} header"),
    (DELIVERY_ID_HEADER, "two words", 400, f"{DELIVERY_ID_HEADER} is not well-formed"),
    (DELIVERY_ID_HEADER, "x" * 201, 400, f"{DELIVERY_ID_HEADER} is not well-formed"),
    (DELIVERY_ID_HEADER, "caf\u00e9", 400, f"{DELIVERY_ID_HEADER} is not well-formed"),
    (TIMESTAMP_HEADER, f"+{NOW}", 400, f"{TIMESTAMP_HEADER} is not Unix seconds"),
    (TIMESTAMP_HEADER, f"{NOW}.5", 400, f"{TIMESTAMP_HEADER} is not Unix seconds"),
    (TIMESTAMP_HEADER, "1_795_793_706", 400, f"{TIMESTAMP_HEADER} is not Unix seconds"),
    (TIMESTAMP_HEADER, str(NOW - 301), 400, "timestamp 301 s in the past (accepted: 300 s)"),
    (TIMESTAMP_HEADER, str(NOW + 301), 400, "timestamp 301 s in the future (accepted: 300 s)"),
    (SIGNATURE_HEADER, "v1,abc", 401, "signature does not match"),
    (SIGNATURE_HEADER, "v2," + "A" * 43 + "=", 401, "signature does not match"),
    (SIGNATURE_HEADER, " ".join(["v1," + "A" * 43 + "="] * 30), 401, "signature does not match"),  # > 1 KiB
])
def test_headers_that_cannot_be_authentic_are_refused_before_the_body(header: str, value: str | None, status: int,
                                                                      reason: str) -> None:
    h = headers(body())
    if value is None:
        del h[header]
    else:
        h[header] = value
    with pytest.raises(Rejected) as raised:
        verifier().check_headers(h)
    assert (raised.value.status, raised.value.reason) == (status, reason)


def test_several_signatures_pass_the_header_check_if_one_is_a_well_formed_v1() -> None:
    h = headers(body())
    h[SIGNATURE_HEADER] = "v2,zzz v1,garbage " + h[SIGNATURE_HEADER]
    verifier().check_headers(h)


# ---- the receiver's log lines: once, then counted -------------------------------------------------


def test_log_limiter_logs_a_kind_once_a_minute_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(0.0)
    limiter = webhooks._LogLimiter(60.0, clock)
    caplog.set_level("WARNING", "connector.webhooks")
    for i in range(100):
        limiter.warning("slow", 1, "closed connection %d", i)
        limiter.warning("rejected 401", 3, "rejected %d", i)
        clock.now += 0.1  # 100 of each in 10 s
    limiter.flush()
    assert caplog.messages == ["closed connection 0", "rejected 0", "rejected 1", "rejected 2"]
    clock.now = 59.9
    limiter.flush()
    assert len(caplog.messages) == 4
    clock.now = 60.0
    limiter.flush()  # the minute after the first lines is over: one line each, with the count and the latest
    assert caplog.messages[4:] == ["99 more in 60 s like this one: closed connection 99",
                                   "97 more in 60 s like this one: rejected 99"]
    clock.now = 70.0
    limiter.warning("slow", 1, "closed connection %d", 100)  # within the minute of the count's line: held
    limiter.flush()
    assert len(caplog.messages) == 6
    clock.now = 80.0
    limiter.flush(everything=True)  # at stop
    assert caplog.messages[6:] == ["1 more in 10 s like this one: closed connection 100"]
    clock.now = 500.0
    limiter.warning("slow", 1, "closed connection %d", 101)  # a quiet minute later: logged at once again
    assert caplog.messages[-1] == "closed connection 101"
