"""docs/configuration.md is generated from the configuration models (connector/config_reference.py): the file
must be what the generator writes now, every field must have a description, and the environment variable the
models name for a field must be the one that stands in for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import parse
from connector.config_reference import COMMAND, DOC_PATH, render, sections

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date() -> None:
    doc = REPO / DOC_PATH
    written = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if written != render():
        pytest.fail(f"{DOC_PATH} is out of date with connector/config.py: regenerate it with `{COMMAND}` "
                    "(from the repository root, in the project's environment)", pytrace=False)


def test_every_field_has_a_description() -> None:
    missing = [row.path for section in sections() for row in section.rows if not row.description]
    assert not missing, (f"fields without a description: {', '.join(missing)}. Write a docstring under each in "
                         f"connector/config.py, then run `{COMMAND}`")


def test_every_section_is_documented_once_with_full_paths() -> None:
    found = sections()
    paths = [row.path for section in found for row in section.rows]
    assert len(paths) == len(set(paths))
    assert "source.config.stateful_ingestion.fail_safe_threshold" in paths and "kafka.topics.changes" in paths
    assert [s.path for s in found][:3] == ["", "source", "source.config"]
    text = render()
    for section in found[1:]:
        assert f"\n## {section.path}\n" in text


def test_secrets_are_marked() -> None:
    secret = {row.path for section in sections() for row in section.rows if row.secret}
    assert {"source.config.password", "source.config.token", "webhooks.secret"} <= secret
    assert "| `webhooks.secret` | string, **secret** |" in render()


ENVIRONMENT = {
    "source.config.tracking_uri": "MLFLOW_TRACKING_URI",
    "source.config.registry_uri": "MLFLOW_REGISTRY_URI",
    "source.config.username": "MLFLOW_TRACKING_USERNAME",
    "source.config.password": "MLFLOW_TRACKING_PASSWORD",
    "source.config.token": "MLFLOW_TRACKING_TOKEN",
    "kafka.bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "kafka.schema_registry_url": "SCHEMA_REGISTRY_URL",
    "webhooks.secret": "MLFLOW_DATAHUB_WEBHOOK_SECRET",
}


def test_environment_variables_named_in_the_models_are_the_ones_read(monkeypatch: pytest.MonkeyPatch) -> None:
    named = {row.path: row.env for section in sections() for row in section.rows if row.env}
    assert named == ENVIRONMENT
    values = {name: f"from-env-{i}" for i, name in enumerate(ENVIRONMENT.values())}
    values["MLFLOW_TRACKING_URI"] = "http://tracking.example:5000"
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    cfg = parse({"source": {"type": "mlflow"}, "webhooks": {}})
    assert cfg.mlflow.resolved_tracking_uri() == values["MLFLOW_TRACKING_URI"]
    assert cfg.mlflow.resolved_registry_uri() == values["MLFLOW_REGISTRY_URI"]
    assert cfg.kafka.resolved_bootstrap() == values["KAFKA_BOOTSTRAP_SERVERS"]
    assert cfg.kafka.resolved_schema_registry() == values["SCHEMA_REGISTRY_URL"]
    assert cfg.webhooks is not None and cfg.webhooks.resolved_secret() == values["MLFLOW_DATAHUB_WEBHOOK_SECRET"]

    # The credentials are read by MLflow's client itself; the configured ones are put on top of them.
    from connector.mlflow.reader import host_credentials, reader_settings

    settings = reader_settings(cfg)
    creds = host_credentials(settings.tracking_uri, settings)
    assert (creds.username, creds.password, creds.token) == (
        values["MLFLOW_TRACKING_USERNAME"], values["MLFLOW_TRACKING_PASSWORD"], values["MLFLOW_TRACKING_TOKEN"])
