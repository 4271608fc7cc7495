"""Bad configuration stops start-up with one clear line naming the field, exit code 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from connector.config import ConfigError, load
from connector.devstack.mlflow_server import free_port
from tests.conftest import ConfigFactory, run_cli


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_clean_failure(result, *fragments: str) -> None:  # noqa: ANN001
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"source": {"type": "mlflow", "config": {"tracking_urii": "http://x"}}},
         ["source.config.tracking_urii: unknown field"]),
        ({"source": {"type": "mlflow", "config": {"stateful_ingestion": {"enabled": "perhaps"}}}},
         ["source.config.stateful_ingestion.enabled", "valid boolean", "'perhaps'"]),
        ({"source": {"type": "mlflow", "config": {"stateful_ingestion": {"fail_safe_threshold": 140}}}},
         ["source.config.stateful_ingestion.fail_safe_threshold", "less than or equal to 100"]),
        ({"source": {"type": "mlflow"}, "kafka": {"partitions": "three"}},
         ["kafka.partitions", "valid integer"]),
        ({"source": {"type": "glue"}}, ["source.type", "'mlflow'"]),
        ({"kafka": {}}, ["source: required field is missing"]),
        ({"source": {"type": "mlflow", "config": {"username": "u"}}},
         ["username and password must be set together"]),
        ({"source": {"type": "mlflow", "config": {"env": "staging-ish"}}},
         ["source.config.env", "env must be one of"]),
    ],
)
def test_invalid_configuration_is_rejected(tmp_path: Path, data: dict, fragments: list[str]) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load(path)
    for fragment in fragments:
        assert fragment in str(error.value)
    _assert_clean_failure(run_cli("snapshot", "-c", str(path)), "configuration error", *fragments[:1])


def test_recipe_of_the_original_is_accepted(tmp_path: Path) -> None:
    recipe = {
        "pipeline_name": "mlflow-prod",
        "source": {"type": "mlflow", "config": {
            "tracking_uri": "http://mlflow:5000", "registry_uri": "http://registry:5000",
            "model_name_separator": "-", "base_external_url": "https://mlflow.example.com", "env": "DEV",
            "stateful_ingestion": {"enabled": True}}},
        "sink": {"type": "datahub-kafka", "config": {"connection": {
            "bootstrap": "broker:9092", "schema_registry_url": "http://registry:8081"}}},
    }
    cfg = load(_write(tmp_path, recipe))
    assert cfg.mlflow.resolved_registry_uri() == "http://registry:5000"
    assert cfg.kafka.resolved_bootstrap() == "broker:9092"
    assert cfg.kafka.resolved_schema_registry() == "http://registry:8081"
    settings = cfg.mapping_settings()
    assert (settings.env, settings.model_name_separator, settings.base_external_url) == (
        "DEV", "-", "https://mlflow.example.com")
    assert cfg.stateful.enabled and cfg.stateful.fail_safe_threshold == 75


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    _assert_clean_failure(run_cli("snapshot", "-c", str(tmp_path / "absent.yml")), "no such file")
    bad = tmp_path / "bad.yml"
    bad.write_text("source: [unclosed\n")
    _assert_clean_failure(run_cli("snapshot", "-c", str(bad)), "not valid YAML")


def test_unreachable_mlflow(make_config: ConfigFactory) -> None:
    path, _ = make_config(f"http://127.0.0.1:{free_port()}")
    result = run_cli("snapshot", "-c", str(path), "--mlflow-retry-seconds", "2")
    _assert_clean_failure(result, "source.config.tracking_uri", "did not answer")


def test_unreachable_broker(make_config: ConfigFactory) -> None:
    path, _ = make_config("http://127.0.0.1:1", {"kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"}})
    result = run_cli("snapshot", "-c", str(path))
    _assert_clean_failure(result, "kafka.bootstrap_servers", "no Kafka broker answers")


def test_recipe_pipeline_fields_are_ignored_and_env_is_normalised(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    recipe = {
        "run_id": "nightly", "datahub_api": {"server": "http://gms:8080"}, "transformers": [],
        "source": {"type": "mlflow", "config": {"tracking_uri": "http://mlflow:5000", "env": "dev",
                                                 "stateful_ingestion": {"enabled": True, "ignore_old_state": False}}},
        "sink": {"type": "datahub-kafka", "config": {"connection": {
            "bootstrap": "broker:9092", "schema_registry_url": "http://registry:8081",
            "producer_config": {"security.protocol": "SASL_SSL"},
            "schema_registry_config": {"basic.auth.user.info": "u:p"}}}},
    }
    with caplog.at_level("WARNING"):
        cfg = load(_write(tmp_path, recipe))
    assert cfg.mapping_settings().env == "DEV"  # upper-cased, as the original does
    assert cfg.kafka.producer_config == {"security.protocol": "SASL_SSL"}
    assert cfg.kafka.schema_registry_config == {"basic.auth.user.info": "u:p"}
    ignored = [r.getMessage() for r in caplog.records]
    assert any("'run_id'" in m and "ignored" in m for m in ignored)
    assert any("'datahub_api'" in m for m in ignored)


def test_a_secret_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {"source": {"type": "mlflow", "config": {"password": "hunter2"}}})
    with pytest.raises(ConfigError) as error:
        load(path)
    assert "hunter2" not in str(error.value)
    assert "username and password must be set together" in str(error.value)
