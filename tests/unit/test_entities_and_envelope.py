"""MLflow objects -> change events (connector/changes.py) and the change keys (connector/events.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from mlflow.entities import Metric

from connector.contract import envelope, fitting
from connector.contract.events import (
    RECORD_NAMES,
    SNAPSHOT_MARKER_KEY,
    entity_key,
    experiment_key,
    kind_of_key,
    model_version_key,
    model_version_of_key,
    registered_model_key,
    run_key,
)
from connector.mlflow import entities as changes
from tests import mlflow_objects as mo

# ---- experiments ------------------------------------------------------------------------------


def test_experiment_state_carries_every_field() -> None:
    state = changes.experiment_state(mo.experiment("7", "demo/training runs", tags={"a": "1", "b": "2"}))
    assert state == {
        "experiment_id": "7",
        "name": "demo/training runs",
        "artifact_location": "/tmp/mlf/artifacts/1",
        "lifecycle_stage": "active",
        "tags": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}],
        "creation_time": 1_795_793_700_000,
        "last_update_time": 1_795_793_700_100,
    }


def test_experiment_state_keeps_deleted_lifecycle() -> None:
    assert changes.experiment_state(mo.experiment(lifecycle_stage="deleted"))["lifecycle_stage"] == "deleted"


def test_experiment_event_key_and_shape() -> None:
    event = mo.changed("EXPERIMENT", changes.experiment_state(mo.experiment("42")), op="CREATE")
    assert event["key"] == "experiment:42"
    assert event["op"] == "CREATE"
    assert event["kind"] == "EXPERIMENT"
    assert event["source"] == {
        "connector": "mlflow-datahub",
        "version": "0.1.0",
        "tracking_uri": mo.TRACKING_URI,
        "registry_uri": mo.TRACKING_URI,
        "read_at_ms": mo.READ_AT_MS,
        "snapshot_id": None,
    }
    assert event["ts_ms"] == mo.READ_AT_MS + 1


# ---- runs -------------------------------------------------------------------------------------


def test_run_state_carries_every_field() -> None:
    mlflow_run = mo.run(
        "r1",
        experiment_id="7",
        params={"lr": "0.1"},
        metrics=[Metric("acc", 0.5, 10, 1), Metric("acc", 0.75, 20, 2), Metric("loss", 2, 30, 0)],
        tags={"t": "v"},
        datasets=[mo.dataset_input("iris", "local", tags={"mlflow.data.context": "eval"})],
    )
    state = changes.run_state(mlflow_run, "exp name", [{"name": "m", "version": "1"}])
    assert state == {
        "run_id": "r1",
        "run_name": "finished run",
        "experiment_id": "7",
        "experiment_name": "exp name",
        "status": "FINISHED",
        "lifecycle_stage": "active",
        "start_time": 1_795_793_700_532,
        "end_time": 1_795_793_700_665,
        "user_id": "alice",
        "artifact_uri": "/tmp/mlf/artifacts/1/0d03f13b7d7e45b59784c93c1b108efd/artifacts",
        "params": [{"key": "lr", "value": "0.1"}],
        # the latest value of each metric, with its timestamp and step; values are floats
        "metrics": [
            {"key": "acc", "value": 0.75, "timestamp": 20, "step": 2},
            {"key": "loss", "value": 2.0, "timestamp": 30, "step": 0},
        ],
        "tags": [{"key": "t", "value": "v"}],
        "dataset_inputs": [
            {
                "name": "iris",
                "digest": "d1g35t",
                "source_type": "local",
                "source": "file:///tmp/iris.csv",
                "schema": mo.COLSPEC_SCHEMA,
                "profile": None,
                "tags": [{"key": "mlflow.data.context", "value": "eval"}],
            }
        ],
        "model_versions": [{"name": "m", "version": "1"}],
    }
    assert isinstance(state["metrics"][1]["value"], float)


def test_run_state_orders_model_versions_numerically() -> None:
    refs = [{"name": "b", "version": "1"}, {"name": "a", "version": "10"}, {"name": "a", "version": "9"}]
    state = changes.run_state(mo.run(), "exp", refs)  # type: ignore[arg-type]
    assert state["model_versions"] == [
        {"name": "a", "version": "9"},
        {"name": "a", "version": "10"},
        {"name": "b", "version": "1"},
    ]


def test_run_state_of_running_run_without_name() -> None:
    state = changes.run_state(mo.run(status="RUNNING", end_time=None, run_name="", user_id=""), "exp", [])
    assert state["status"] == "RUNNING"
    assert state["end_time"] is None
    assert state["run_name"] is None
    assert state["user_id"] is None


def test_run_state_without_inputs() -> None:
    state = changes.run_state(mo.run(datasets=[]), "exp", [])
    assert state["dataset_inputs"] == []
    assert state["model_versions"] == []


def test_run_event_key() -> None:
    event = mo.run_event(mo.run("abc"))
    assert event["key"] == "run:abc"
    assert event["kind"] == "RUN"


def test_run_summary_is_what_versions_need() -> None:
    state = changes.run_state(mo.run("r9"), "exp", [])
    assert changes.run_summary(state) == {
        "run_id": "r9",
        "params": state["params"],
        "metrics": state["metrics"],
        "dataset_inputs": state["dataset_inputs"],  # v3: what the version was trained on
    }


# ---- registered models and versions -----------------------------------------------------------


def test_registered_model_state_carries_every_field() -> None:
    model = mo.registered_model(
        "demo/m x", latest=[("3", "Archived"), ("4", "Production")], aliases={"prod": "4", "champion": "4"}
    )
    assert changes.registered_model_state(model) == {
        "name": "demo/m x",
        "description": "Classifies demo data",
        "creation_timestamp": 1_795_793_701_129,
        "last_updated_timestamp": 1_795_793_701_606,
        "tags": [{"key": "domain", "value": "demo"}],
        "aliases": [{"alias": "champion", "version": "4"}, {"alias": "prod", "version": "4"}],
        "latest_versions": [{"version": "3", "stage": "Archived"}, {"version": "4", "stage": "Production"}],
        "features": [],  # joined by the producer from its versions' signatures (with_features)
    }


def test_registered_model_without_versions() -> None:
    state = changes.registered_model_state(mo.registered_model(latest=[], description=""))
    assert state["latest_versions"] == []
    assert state["description"] == ""  # kept as MLflow gives it, like the original
    assert mo.changed("REGISTERED_MODEL", state)["key"] == "registered_model:demo classifier"


def test_aliases_by_version() -> None:
    model = changes.registered_model_state(mo.registered_model(aliases={"b": "2", "a": "2", "c": "3"}))
    assert changes.aliases_by_version(model) == {"2": ["a", "b"], "3": ["c"]}


def test_model_version_state_carries_every_field() -> None:
    summary = changes.run_summary(changes.run_state(mo.run("r1"), "exp", []))
    version = mo.model_version("demo/m x", "2", stage="Staging", run_id="r1", aliases=["own"])
    assert changes.model_version_state(version, ["champion"], summary) == {
        "name": "demo/m x",
        "version": "2",
        "creation_timestamp": 1_795_793_701_207,
        "last_updated_timestamp": 1_795_793_701_351,
        "description": "version for Production",
        "user_id": "alice",
        "current_stage": "Staging",
        "source": "models:/demo/m x/2",
        "run_id": "r1",
        "status": "READY",
        "tags": [{"key": "stage_hint", "value": "production"}],
        # the registered model's aliases of this version, with any the version itself carries
        "aliases": ["champion", "own"],
        "run": summary,
        # not read (connector/mlflow/signatures.py reads them)
        "signature_status": None,
        "signature_reason": None,
        "signature": None,
    }


def test_model_version_without_run_or_stage() -> None:
    version = mo.model_version(stage=None, run_id=None, user_id="", description=None)
    state = changes.model_version_state(version, [], None)
    assert state["current_stage"] == ""  # a registry without stages (Unity Catalog answers None)
    assert changes.model_version_state(mo.model_version(stage="None"), [], None)["current_stage"] == "None"
    assert state["run_id"] is None
    assert state["run"] is None
    assert state["user_id"] is None
    assert mo.changed("MODEL_VERSION", state)["key"] == "model_version:demo classifier/1"


def test_model_version_event_takes_aliases_from_registered_model() -> None:
    model = mo.registered_model(aliases={"champion": "1", "challenger": "2"})
    event = mo.model_version_event(mo.model_version(version="1"), model, mo.run())
    assert event["after"]["aliases"] == ["champion"]  # type: ignore[index]


# ---- deletes and markers ----------------------------------------------------------------------


def test_entity_deleted_has_no_state() -> None:
    event = envelope.entity_deleted("run:abc", "RUN", mo.source(), 5)
    assert event == {
        "op": "DELETE",
        "kind": "RUN",
        "key": "run:abc",
        "after": None,
        "source": mo.source(),
        "ts_ms": 5,
    }


def test_snapshot_marker() -> None:
    event = envelope.snapshot_marker(
        "SNAPSHOT_END", "s1", 3, mo.source(snapshot_id="s1"), 9, complete=True, entities=12
    )
    assert event["key"] == "snapshot"  # one key for all markers: compaction keeps the latest
    assert event["kind"] == "SNAPSHOT"
    assert event["after"] == {"snapshot_id": "s1", "partitions": 3, "complete": True, "entities": 12}
    assert event["source"]["snapshot_id"] == "s1"


# ---- fingerprints -----------------------------------------------------------------------------


def _states() -> dict[str, Any]:
    summary = changes.run_summary(changes.run_state(mo.run(), "exp", []))
    return {
        "experiment": changes.experiment_state(mo.experiment()),
        "run": changes.run_state(
            mo.run(datasets=[mo.dataset_input()]), "demo/training runs", [{"name": "m", "version": "1"}]
        ),
        "registered_model": changes.registered_model_state(mo.registered_model(aliases={"champion": "1"})),
        "model_version": changes.model_version_state(mo.model_version(), ["champion"], summary),
    }


def _changed(value: Any) -> Any:
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return "x"
    if isinstance(value, list):
        return value[:-1] if value else [{"key": "k", "value": "v"}]
    if isinstance(value, dict):
        key = sorted(value)[0]
        return {**value, key: _changed(value[key])}
    raise TypeError(type(value))


def _field_cases() -> list[tuple[str, str]]:
    return [(kind, name) for kind, state in _states().items() for name in state]


def test_fingerprint_of_equal_states_is_equal() -> None:
    for kind, state in _states().items():
        again = _states()[kind]
        assert state is not again
        assert envelope.fingerprint(state) == envelope.fingerprint(again), kind
        # key order of the dicts does not matter
        reordered = dict(reversed(list(copy.deepcopy(state).items())))
        assert envelope.fingerprint(reordered) == envelope.fingerprint(state), kind


@pytest.mark.parametrize(("kind", "field"), _field_cases())
def test_fingerprint_changes_with_any_field(kind: str, field: str) -> None:
    state = _states()[kind]
    other = copy.deepcopy(state)
    other[field] = _changed(state[field])
    assert other != state
    assert envelope.fingerprint(other) != envelope.fingerprint(state)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["tags"][0].update(value="other"),
        lambda s: s["metrics"][0].update(value=0.94),
        lambda s: s["metrics"][0].update(step=4),
        lambda s: s["params"].append({"key": "new", "value": "1"}),
        lambda s: s["dataset_inputs"][0]["tags"][0].update(value="eval"),
        lambda s: s["model_versions"].append({"name": "m", "version": "2"}),
    ],
    ids=["tag value", "metric value", "metric step", "new param", "dataset tag", "new version"],
)
def test_fingerprint_changes_with_nested_field(mutate: Any) -> None:
    state = _states()["run"]
    other = copy.deepcopy(state)
    mutate(other)
    assert envelope.fingerprint(other) != envelope.fingerprint(state)


def test_fingerprint_tells_none_from_empty_and_missing_state() -> None:
    state = _states()["experiment"]
    assert envelope.fingerprint({**state, "artifact_location": None}) != envelope.fingerprint(
        {**state, "artifact_location": "None"}
    )
    assert envelope.fingerprint(None) != envelope.fingerprint(state)


# ---- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("demo classifier", "1"),
        ("team/model", "12"),
        ("a/b/c", "3"),
        ("/leading", "2"),
        ("trailing/", "4"),
        ("with:colon", "5"),
    ],
)
def test_model_version_of_key_with_slashes(name: str, version: str) -> None:
    key = model_version_key(name, version)
    assert key == f"model_version:{name}/{version}"
    assert model_version_of_key(key) == (name, version)
    assert kind_of_key(key) == "MODEL_VERSION"


def test_entity_keys_and_kinds() -> None:
    states = _states()
    assert entity_key("EXPERIMENT", states["experiment"]) == experiment_key("1") == "experiment:1"
    assert entity_key("RUN", states["run"]) == run_key("0d03f13b7d7e45b59784c93c1b108efd")
    assert entity_key("REGISTERED_MODEL", states["registered_model"]) == registered_model_key(
        "demo classifier"
    )
    assert entity_key("MODEL_VERSION", states["model_version"]) == model_version_key("demo classifier", "1")
    for key, kind in [
        (experiment_key("1"), "EXPERIMENT"),
        (run_key("r"), "RUN"),
        (registered_model_key("a/b"), "REGISTERED_MODEL"),
        (SNAPSHOT_MARKER_KEY, "SNAPSHOT"),
        ("logged_model:m-1", "LOGGED_MODEL"),
    ]:
        assert kind_of_key(key) == kind
    assert set(RECORD_NAMES) == {"EXPERIMENT", "RUN", "REGISTERED_MODEL", "MODEL_VERSION", "SNAPSHOT", "LOGGED_MODEL"}


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValueError):
        kind_of_key("dataset:x")
    with pytest.raises(ValueError):
        entity_key("SNAPSHOT", _states()["experiment"])


def test_an_oversized_change_event_is_truncated_with_a_note() -> None:
    from connector.contract import codec

    run = changes.run_state(
        mo.run("r" * 32, params={f"p{i:05d}": "x" * 500 for i in range(3000)}), "exp", [])
    event = envelope.entity_changed("UPDATE", "RUN", run, envelope.source_block("http://m", "http://m", 1), 2)
    assert len(codec.encode(event)) > 1_000_000
    fitted, value, note = fitting.fit_event(event, codec.encode, 1_000_000)
    assert len(value) <= 1_000_000 and codec.decode(value) == fitted
    assert 0 < len(fitted["after"]["params"]) < 3000
    assert note is not None and event["key"] in note and "params" in note and "of 3000" in note
    small, same, none = fitting.fit_event(fitted, codec.encode, 1_000_000)
    assert none is None and small is fitted and same == value


def test_an_oversized_model_version_event_cuts_its_runs_params_not_its_links() -> None:
    from connector.contract import codec

    run = changes.run_state(mo.run("r" * 32, params={f"p{i:05d}": "x" * 500 for i in range(3000)}), "exp", [])
    version = changes.model_version_state(mo.model_version(), ["champion"], changes.run_summary(run))
    source = envelope.source_block("http://m", "http://m", 1)
    event = envelope.entity_changed("UPDATE", "MODEL_VERSION", version, source, 2)
    fitted, value, note = fitting.fit_event(event, codec.encode, 1_000_000)
    assert len(value) <= 1_000_000
    assert 0 < len(fitted["after"]["run"]["params"]) < 3000
    assert fitted["after"]["aliases"] == ["champion"]
    assert note is not None and "run.params" in note


def test_an_event_too_large_even_without_lists_cuts_its_free_text_not_its_identity() -> None:
    """A 3 MB description: every list emptied is not enough, so the text is cut. The event always
    travels: one that never reached the change topic would look gone to the consumer."""
    from connector.contract import codec

    model = changes.registered_model_state(mo.registered_model(description="d" * 3_000_000))
    source = envelope.source_block("http://m", "http://m", 1)
    event = envelope.entity_changed("UPDATE", "REGISTERED_MODEL", model, source, 2)
    fitted, value, note = fitting.fit_event(event, codec.encode, 1_000_000)
    assert len(value) <= 1_000_000 and codec.decode(value) == fitted
    assert fitted["after"]["name"] == "demo classifier" and fitted["key"] == event["key"]
    assert 0 < len(fitted["after"]["description"]) < 1_000_000
    assert note is not None and "description" in note and "of 3000000 characters" in note
