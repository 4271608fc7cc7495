"""Secrets stay out of every line the connector writes, and a configuration file that cannot be read
or parsed stops start-up with one line that names the problem (never a value that may be secret)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from connector import cli
from connector.config import ConfigError, load
from connector.redaction import RedactingFormatter, redact, remember_secrets, secret_values, without_credentials

SECRET = "hunter2-s3cr3t"


def test_uri_credentials_are_removed_or_masked() -> None:
    assert without_credentials("http://alice:pw@mlflow:5000/x") == "http://mlflow:5000/x"
    assert without_credentials("http://mlflow:5000") == "http://mlflow:5000"
    text = redact("MLflow at https://alice:pw@mlflow.example.com:5000 unreachable; registry http://u:p@r:8081")
    assert "alice" not in text and ":pw" not in text and "u:p@" not in text
    assert "https://***@mlflow.example.com:5000" in text and "http://***@r:8081" in text


def test_remembered_secrets_are_masked_wherever_they_appear() -> None:
    remember_secrets(["registry-user:basic-pass-42", "sasl-pass-77", None, "ab"])
    text = redact("auth basic-pass-42 failed for sasl-pass-77; 'ab' is too short to be masked")
    assert "basic-pass-42" not in text and "sasl-pass-77" not in text and text.count("***") == 2
    assert "'ab'" in text


def test_secret_values_are_found_under_secret_keys() -> None:
    data = {"source": {"config": {"password": "p1-value", "tracking_uri": "http://u:p2-value@h"}},
            "kafka": {"producer_config": {"sasl.password": "p3-value", "linger.ms": 5},
                      "schema_registry_config": {"basic.auth.user.info": "u:p4-value"},
                      "connection_config": {"ssl.key.password": "p5-value"}},
            "webhooks": {"secret": "p6-value"}}
    found = secret_values(data)
    for value in ("p1-value", "u:p2-value", "p3-value", "u:p4-value", "p5-value", "p6-value"):
        assert value in found
    assert 5 not in found and "5" not in found


def test_the_log_formatter_masks_messages_and_tracebacks() -> None:
    remember_secrets([SECRET])
    formatter = RedactingFormatter("%(message)s")
    try:
        raise RuntimeError(f"token {SECRET} refused at http://bob:{SECRET}@host")
    except RuntimeError as e:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", (e,), exc_info=True)
        record.exc_info = (type(e), e, e.__traceback__)
    out = formatter.format(record)
    assert SECRET not in out and "bob" not in out and "Traceback" in out


def test_an_unexpected_error_shows_its_traceback_without_secrets(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    remember_secrets([SECRET])

    def boom(args: object) -> int:
        raise ValueError(f"could not use {SECRET}")

    monkeypatch.setattr(cli, "cmd_dump", boom)
    assert cli.main(["dump", "-c", "x.yml", "--out", "y.json"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: could not use ***" in err and SECRET not in err


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "connector.yml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_duplicated_key_names_the_key_and_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "source:\n  type: mlflow\n  config:\n    tracking_uri: http://a\n    tracking_uri: http://b\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'tracking_uri' appears twice"):
        load(path)


def test_the_same_key_in_different_mappings_is_fine(tmp_path: Path) -> None:
    path = _write(tmp_path, "source:\n  type: mlflow\n  config: {env: DEV}\nkafka:\n  topics: {state: s}\n"
                            "producer: {page_size: 10}\nconsumer: {batch_size: 10}\n")
    assert load(path).mlflow.env == "DEV"


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: tmp / "absent.yml", "no such file"),
    (lambda tmp: _write(tmp, b"\xff\xfe\x00binary"), "not a text file"),
])
def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path, make, words: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as e:
        load(make(tmp_path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_syntax_error_does_not_echo_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, f'source:\n  type: mlflow\n  config:\n    password: "{SECRET}"x\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert "not valid YAML" in str(e.value) and "line 4" in str(e.value)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("kafka", [
    {"producer_config": f"sasl.password={SECRET}"},
    {"consumer_config": [f"sasl.password={SECRET}"]},
    {"connection_config": SECRET},
    {"schema_registry_config": f"basic.auth.user.info=u:{SECRET}"},
])
def test_a_wrong_typed_settings_block_is_not_echoed(tmp_path: Path, kafka: dict) -> None:
    import yaml

    path = _write(tmp_path, yaml.safe_dump({"source": {"type": "mlflow"}, "kafka": kafka}))
    with pytest.raises(ConfigError) as e:
        load(path)
    field = next(iter(kafka))
    assert f"kafka.{field}" in str(e.value) and SECRET not in str(e.value)
