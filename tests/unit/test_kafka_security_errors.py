"""Security problems librdkafka reports (and retries forever) in the connector's words: which problem,
which bootstrap address, which `kafka.*` field to check; never a setting's value. The error texts
are librdkafka 2.16's own, as the local secured broker produced them."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from connector.config import parse
from connector.kafka.client_logging import ConnectionProblems, KafkaErrors, explain, security_problem
from connector.kafka.clients import KafkaConnection

PREFIX = "sasl_ssl://127.0.0.1:29095/bootstrap: "
WRONG_PASSWORD = (KafkaError._AUTHENTICATION, PREFIX + "SASL authentication error: Authentication failed during "
                  "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 344ms in "
                  "state AUTH_REQ)")
WRONG_PLAIN_PASSWORD = (KafkaError._AUTHENTICATION, PREFIX + "SASL authentication error: Authentication failed: "
                        "Invalid username or password (after 304ms in state AUTH_REQ)")
MECHANISM = (KafkaError._AUTHENTICATION, PREFIX + "SASL SCRAM-SHA-256 mechanism handshake failed: Broker: "
             "Unsupported SASL mechanism: broker's supported mechanisms: PLAIN,SCRAM-SHA-512 (after 304ms in "
             "state AUTH_HANDSHAKE)")
UNTRUSTED = (KafkaError._SSL, PREFIX + "SSL handshake failed: error:0A000086:SSL routines::certificate verify "
             "failed: broker certificate could not be verified, verify that ssl.ca.location is correctly "
             "configured or root CA certificates are installed (install ca-certificates package) (after 12ms in "
             "state SSL_HANDSHAKE)")
UNTRUSTED_SHORT = (KafkaError._TRANSPORT, PREFIX + "error:0A000086:SSL routines::certificate verify failed "
                   "(after 9ms in state SSL_HANDSHAKE)")
TLS_TO_PLAINTEXT = (KafkaError._TRANSPORT, "sasl_ssl://127.0.0.1:29092/bootstrap: SSL handshake failed: "
                    "Disconnected: SSL connection closed by peer: connecting to a PLAINTEXT broker listener? "
                    "(after 5ms in state SSL_HANDSHAKE)")
OAUTH = (KafkaError._AUTHENTICATION, "Failed to acquire SASL OAUTHBEARER token: Invalid sasl.oauthbearer.config: "
         "must not be empty")
NOT_SECURITY = [(KafkaError._TRANSPORT, PREFIX + "Connect to ipv4#127.0.0.1:29095 failed: Connection refused"),
                (KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")]

SCRAM = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "connector",
         "sasl.password": "pw-never-shown-7", "ssl.ca.location": "/etc/kafka/ca.pem"}


def _error(case: tuple[int, str]) -> KafkaError:
    return KafkaError(case[0], case[1])


@pytest.mark.parametrize("case, kind", [(WRONG_PASSWORD, "authentication"), (WRONG_PLAIN_PASSWORD, "authentication"),
                                        (MECHANISM, "mechanism"), (UNTRUSTED, "tls"), (UNTRUSTED_SHORT, "tls"),
                                        (TLS_TO_PLAINTEXT, "tls"), (OAUTH, "authentication")])
def test_security_problems_are_recognised(case: tuple[int, str], kind: str) -> None:
    problem = security_problem(_error(case))
    assert problem is not None and problem.kind == kind
    assert "(after " not in problem.detail and "/bootstrap: " not in problem.detail


@pytest.mark.parametrize("case", NOT_SECURITY)
def test_an_unreachable_broker_is_no_security_problem(case: tuple[int, str]) -> None:
    assert security_problem(_error(case)) is None


def _words(case: tuple[int, str], settings: dict[str, str], origins: dict[str, str] | None = None) -> str:
    problem = security_problem(_error(case))
    assert problem is not None
    line = explain(problem, "broker:9093", settings, origins)
    assert "\n" not in line and settings.get("sasl.password", "-") not in line and "broker:9093" in line
    return line


def test_wrong_credentials_name_the_mechanism_the_user_and_the_fields() -> None:
    line = _words(WRONG_PASSWORD, SCRAM)
    assert line.startswith("kafka.connection_config.sasl.password: authentication failed (SASL SCRAM-SHA-512, "
                           "user 'connector') at Kafka broker:9093; check kafka.connection_config.sasl.username "
                           "and kafka.connection_config.sasl.password")


def test_the_field_is_where_the_setting_was_written() -> None:
    origins = dict.fromkeys(SCRAM, "kafka.producer_config")
    assert "check kafka.producer_config.sasl.username and kafka.producer_config.sasl.password" in _words(
        WRONG_PLAIN_PASSWORD, SCRAM, origins)


def test_a_mechanism_not_offered_says_what_is() -> None:
    line = _words(MECHANISM, {**SCRAM, "sasl.mechanism": "SCRAM-SHA-256"})
    assert line == ("kafka.connection_config.sasl.mechanism: SASL mechanism SCRAM-SHA-256 is not offered by Kafka at "
                    "broker:9093 (it offers PLAIN, SCRAM-SHA-512); check kafka.connection_config.sasl.mechanism")


@pytest.mark.parametrize("case", [UNTRUSTED, UNTRUSTED_SHORT])
def test_an_untrusted_certificate_points_at_the_ca(case: tuple[int, str]) -> None:
    line = _words(case, SCRAM)
    assert line.startswith("kafka.connection_config.ssl.ca.location: TLS handshake failed (certificate verify failed")
    assert "check kafka.connection_config.ssl.ca.location: it must hold the CA" in line
    assert "(not set" in _words(case, {k: v for k, v in SCRAM.items() if k != "ssl.ca.location"})


def test_tls_to_a_plaintext_listener_points_at_the_protocol() -> None:
    line = _words(TLS_TO_PLAINTEXT, SCRAM)
    assert "TLS handshake failed (SSL connection closed by peer: connecting to a PLAINTEXT broker listener?)" in line
    assert "check kafka.connection_config.security.protocol and kafka.bootstrap_servers" in line


def test_oauthbearer_points_at_its_settings() -> None:
    line = _words(OAUTH, {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"})
    assert "authentication failed (SASL OAUTHBEARER)" in line and "kafka.connection_config.sasl.oauthbearer.*" in line


def test_the_error_callback_records_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    problems = ConnectionProblems()
    callback = KafkaErrors("consumer", "broker:9093", problems=problems,
                           words=lambda p: explain(p, "broker:9093", SCRAM))
    with caplog.at_level(logging.WARNING, logger="connector.kafka"):
        for _ in range(5):
            callback(_error(WRONG_PASSWORD))
        callback(_error(NOT_SECURITY[1]))
    assert problems.count == 5 and problems.latest() is not None and problems.latest().kind == "authentication"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "consumer: kafka.connection_config.sasl.password: authentication failed" in warnings[0]
    assert "librdkafka keeps retrying" in warnings[0] and "pw-never-shown-7" not in " ".join(warnings)


def test_the_connection_words_problems_with_the_origin_of_each_setting() -> None:
    cfg = parse({"source": {"type": "mlflow", "config": {"tracking_uri": "http://mlflow:5000"}},
                 "kafka": {"bootstrap_servers": "broker:9093", "producer_config": SCRAM}})
    connection = KafkaConnection(cfg.kafka)
    problem = security_problem(_error(WRONG_PASSWORD))
    assert problem is not None
    assert connection.explain(problem).startswith("kafka.producer_config.sasl.password: authentication failed")
    callback = connection.admin_settings()["error_cb"]
    callback(_error(MECHANISM))
    latest = connection.problems.latest()
    assert latest is not None and latest.kind == "mechanism" and latest.offered == ("PLAIN", "SCRAM-SHA-512")


def test_settings_librdkafka_refuses_name_their_section() -> None:
    cfg = parse({"source": {"type": "mlflow", "config": {"tracking_uri": "http://mlflow:5000"}},
                 "kafka": {"bootstrap_servers": "broker:9093",
                           "producer_config": {**SCRAM, "ssl.keystore.locaton": "/typo"}}})
    connection = KafkaConnection(cfg.kafka)
    with pytest.raises(KafkaException) as refused:
        connection.admin()
    error = str(connection.refused_settings(refused.value))
    assert error.startswith("kafka.producer_config.ssl.keystore.locaton: librdkafka refuses the Kafka client settings")
    assert SCRAM["sasl.password"] not in error
