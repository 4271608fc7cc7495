"""The scope (`experiment_pattern`, `model_pattern`, `max_run_age_days`) and `platform_instance`: pure."""

from __future__ import annotations

import pytest
from datahub.metadata.urns import Urn

from connector.config import ConfigError, parse
from connector.datahub.mapping import MappingSettings, experiment_urn, model_group_urn, model_urn, to_mcps
from connector.mlflow import entities
from connector.mlflow.scope import DAY_MS, Scope
from tests import mlflow_objects as mo

NOW = 1_800_000_000_000


def scope(**config: object) -> Scope:
    return Scope.of(parse({"source": {"type": "mlflow", "config": config}}))


def run_state(experiment_name: str, start_time: int) -> dict:
    state = dict(entities.run_state(mo.run("r1"), experiment_name, []))
    state["start_time"] = start_time
    return state


def test_without_patterns_everything_is_in_scope() -> None:
    s = scope()
    assert s.everything
    assert s.includes("RUN", run_state("any", 0), NOW)  # type: ignore[arg-type]


def test_experiment_pattern_applies_to_experiments_runs_and_logged_models() -> None:
    s = scope(experiment_pattern={"allow": ["^prod/"], "deny": [".*scratch"]})  # DataHub matches from the start
    experiment = entities.experiment_state(mo.experiment("1", "prod/churn"))
    assert s.includes("EXPERIMENT", experiment, NOW)
    assert not s.includes("EXPERIMENT", entities.experiment_state(mo.experiment("2", "prod/scratch")), NOW)
    assert not s.includes("EXPERIMENT", entities.experiment_state(mo.experiment("3", "dev/churn")), NOW)
    assert s.includes("RUN", run_state("PROD/churn", NOW), NOW)  # type: ignore[arg-type]  # ignoreCase
    assert not s.includes("RUN", run_state("dev/churn", NOW), NOW)  # type: ignore[arg-type]
    logged = {"experiment_id": "3", "model_id": "m", "name": "m"}
    assert not s.includes("LOGGED_MODEL", logged, NOW, {"3": "dev/churn"})  # type: ignore[arg-type]
    assert s.includes("LOGGED_MODEL", logged, NOW, {"3": "prod/x"})  # type: ignore[arg-type]


def test_model_pattern_applies_to_models_and_their_versions() -> None:
    s = scope(model_pattern={"deny": ["^experimental"], "ignoreCase": False})
    assert s.includes("REGISTERED_MODEL", entities.registered_model_state(mo.registered_model("churn")), NOW)
    assert not s.includes("MODEL_VERSION", entities.model_version_state(
        mo.model_version("experimental churn"), [], None), NOW)
    assert s.includes("MODEL_VERSION", entities.model_version_state(mo.model_version("Experimental"), [], None), NOW)


def test_runs_older_than_max_run_age_days_are_out_of_scope() -> None:
    s = scope(max_run_age_days=30)
    assert s.includes("RUN", run_state("e", NOW - 29 * DAY_MS), NOW)  # type: ignore[arg-type]
    assert not s.includes("RUN", run_state("e", NOW - 31 * DAY_MS), NOW)  # type: ignore[arg-type]


def test_a_pattern_that_is_no_regular_expression_stops_start_up() -> None:
    with pytest.raises(ConfigError, match=r"source.config.model_pattern.allow.*not a regular expression"):
        parse({"source": {"type": "mlflow", "config": {"model_pattern": {"allow": ["(unclosed"]}}}})


def test_platform_instance_goes_into_urns_and_the_data_platform_instance_aspect() -> None:
    settings = MappingSettings(platform_instance="eu-prod")
    default = MappingSettings()
    assert model_group_urn("churn", settings) == "urn:li:mlModelGroup:(urn:li:dataPlatform:mlflow,eu-prod.churn,PROD)"
    assert model_urn("churn", "3", settings) == "urn:li:mlModel:(urn:li:dataPlatform:mlflow,eu-prod.churn_3,PROD)"
    assert experiment_urn("exp", "eu-prod") != experiment_urn("exp") == experiment_urn("exp", None)
    instance = "urn:li:dataPlatformInstance:(urn:li:dataPlatform:mlflow,eu-prod)"
    for event in (mo.model_version_event(mo.model_version()), mo.changed("EXPERIMENT", entities.experiment_state(
            mo.experiment("1", "exp")))):
        mcps = to_mcps(event, settings).entity.mcps  # type: ignore[union-attr]
        for mcp in mcps:
            Urn.from_string(str(mcp.entityUrn))
        primary = to_mcps(event, settings).entity.primary_urn  # type: ignore[union-attr]
        aspects = {m.aspectName: m.aspect for m in mcps if m.entityUrn == primary}
        assert aspects["dataPlatformInstance"].instance == instance  # type: ignore[union-attr]
        plain = to_mcps(event, default).entity  # type: ignore[union-attr]
        assert plain is not None and all(
            m.aspectName != "dataPlatformInstance" or m.aspect.instance is None for m in plain.mcps)  # type: ignore
