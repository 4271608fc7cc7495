"""The producer's memory between cycles (connector/mlflow/incremental.py): the watermarks of the
listings, and `Known`, what was published (fingerprints per key, a version's own fingerprint, which
versions a run produced and which a model holds, which runs are still active). Pure: states built
from in-memory MLflow objects."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from connector.contract.envelope import fingerprint
from connector.contract.events import (
    EntityKind,
    entity_key,
    experiment_key,
    model_version_key,
    registered_model_key,
    run_key,
)
from connector.mlflow import entities as changes
from connector.mlflow.incremental import Known, Watermarks, version_own_fingerprint
from tests import mlflow_objects as mo

# ---- Watermarks ---------------------------------------------------------------------------------

FIELDS = ("experiments", "registered_models", "model_versions", "runs", "logged_models")


def test_watermarks_round_trip_through_a_dict_and_json() -> None:
    marks = Watermarks(experiments=1, registered_models=2, model_versions=3, runs=4, logged_models=5)
    d = marks.to_dict()
    assert d == {"experiments": 1, "registered_models": 2, "model_versions": 3, "runs": 4, "logged_models": 5}
    assert Watermarks.from_dict(json.loads(json.dumps(d))) == marks


def test_unset_watermarks_are_left_out_and_come_back_unset() -> None:
    marks = Watermarks(runs=1_795_793_700_532)
    assert marks.to_dict() == {"runs": 1_795_793_700_532}
    assert Watermarks.from_dict(marks.to_dict()) == marks
    assert Watermarks().to_dict() == {}
    assert Watermarks.from_dict({}) == Watermarks()
    assert all(getattr(Watermarks.from_dict({}), f) is None for f in FIELDS)


def test_from_dict_ignores_keys_it_does_not_know() -> None:
    """A position written by another version of the connector may carry other watermarks."""
    assert Watermarks.from_dict({"runs": 7, "traces": 9}) == Watermarks(runs=7)


def test_zero_is_a_watermark_not_an_unset_one() -> None:
    assert Watermarks(experiments=0).to_dict() == {"experiments": 0}
    assert Watermarks(experiments=0).advanced(Watermarks()).experiments == 0


def test_include_advances_each_kind_s_own_watermark_by_its_own_time() -> None:
    marks = Watermarks(runs=100)
    marks.include("EXPERIMENT", {"last_update_time": 50})  # type: ignore[arg-type]
    marks.include("RUN", {"start_time": 90})  # type: ignore[arg-type]  # earlier than the watermark: kept
    marks.include("RUN", {"start_time": 120})  # type: ignore[arg-type]
    marks.include("RUN", {"start_time": None})  # type: ignore[arg-type]  # no time: nothing to say
    marks.include("REGISTERED_MODEL", {"last_updated_timestamp": 7})  # type: ignore[arg-type]
    marks.include("MODEL_VERSION", {"last_updated_timestamp": 0})  # type: ignore[arg-type]
    marks.include("LOGGED_MODEL", {"last_updated_timestamp": 3})  # type: ignore[arg-type]
    assert marks == Watermarks(experiments=50, registered_models=7, model_versions=0, runs=120, logged_models=3)


def test_advanced_takes_the_later_of_each_field() -> None:
    mine = Watermarks(experiments=10, registered_models=50, model_versions=None, runs=7, logged_models=None)
    theirs = Watermarks(experiments=20, registered_models=40, model_versions=3, runs=None, logged_models=None)
    assert mine.advanced(theirs) == Watermarks(experiments=20, registered_models=50, model_versions=3, runs=7,
                                               logged_models=None)
    assert theirs.advanced(mine) == mine.advanced(theirs)


def test_advanced_changes_neither_operand() -> None:
    mine, theirs = Watermarks(runs=1), Watermarks(runs=2, experiments=5)
    result = mine.advanced(theirs)
    assert result is not mine and result is not theirs
    assert mine == Watermarks(runs=1) and theirs == Watermarks(runs=2, experiments=5)


@pytest.mark.parametrize("field", FIELDS)
def test_advanced_moves_each_field_on_its_own(field: str) -> None:
    base = Watermarks(**{f: 100 for f in FIELDS})
    later = base.advanced(Watermarks(**{field: 200}))
    assert getattr(later, field) == 200
    assert all(getattr(later, f) == 100 for f in FIELDS if f != field)
    assert base.advanced(Watermarks(**{field: 50})) == base  # never backwards


# ---- Known: fingerprints ------------------------------------------------------------------------


def experiment_state(**kwargs: Any) -> Any:
    return changes.experiment_state(mo.experiment(**kwargs))


def run_state(run_id: str = "r1", status: str = "FINISHED", versions: list[tuple[str, str]] | None = None,
              **kwargs: Any) -> Any:
    refs = [{"name": n, "version": v} for n, v in versions or []]
    return changes.run_state(mo.run(run_id, status=status, **kwargs), "demo/training runs", refs)


def version_state(name: str = "demo classifier", version: str = "1", run_id: str | None = "r1",
                  aliases: list[str] | None = None, **kwargs: Any) -> Any:
    run = changes.run_summary(run_state(run_id)) if run_id else None
    return changes.model_version_state(mo.model_version(name, version, run_id=run_id, **kwargs), aliases or [], run)


def remember(known: Known, kind: EntityKind, entity: Any) -> None:
    known.remember(kind, entity_key(kind, entity), entity)


def test_unknown_entities_have_changed() -> None:
    known = Known()
    assert known.changed("EXPERIMENT", experiment_state())
    assert known.changed("RUN", run_state())
    assert known.changed("MODEL_VERSION", version_state())


def test_a_remembered_state_has_not_changed_until_its_content_does() -> None:
    known = Known()
    state = experiment_state()
    remember(known, "EXPERIMENT", state)
    assert known.fingerprints == {experiment_key("1"): fingerprint(state)}
    assert not known.changed("EXPERIMENT", copy.deepcopy(state))
    assert not known.changed("EXPERIMENT", experiment_state())  # read again, same content
    assert known.changed("EXPERIMENT", experiment_state(name="renamed"))
    assert known.changed("EXPERIMENT", experiment_state(tags={"team": "other"}))
    assert known.changed("EXPERIMENT", experiment_state(experiment_id="2"))  # other key


def test_remembering_a_new_state_replaces_the_old_one() -> None:
    known = Known()
    old, new = experiment_state(), experiment_state(name="renamed")
    remember(known, "EXPERIMENT", old)
    remember(known, "EXPERIMENT", new)
    assert not known.changed("EXPERIMENT", new)
    assert known.changed("EXPERIMENT", old)  # back to the old content is a change too
    assert len(known.fingerprints) == 1


def test_a_deleted_entity_is_forgotten() -> None:
    known = Known()
    state = experiment_state()
    remember(known, "EXPERIMENT", state)
    known.remember("EXPERIMENT", experiment_key("1"), None)
    assert experiment_key("1") not in known.fingerprints
    assert known.changed("EXPERIMENT", state)  # it reappears: published again
    known.remember("EXPERIMENT", experiment_key("never seen"), None)  # forgetting the unknown is harmless
    assert known.fingerprints == {}


def test_same_content_under_different_kinds_is_tracked_per_key() -> None:
    known = Known()
    model = changes.registered_model_state(mo.registered_model("m"))
    remember(known, "REGISTERED_MODEL", model)
    assert set(known.fingerprints) == {registered_model_key("m")}
    assert not known.changed("REGISTERED_MODEL", model)
    assert known.changed("MODEL_VERSION", version_state("m", "1"))


# ---- Known: runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["RUNNING", "SCHEDULED"])
def test_active_runs_are_remembered_until_they_finish(status: str) -> None:
    known = Known()
    remember(known, "RUN", run_state("r1", status=status))
    remember(known, "RUN", run_state("r2", status="FINISHED"))
    assert known.active_runs == {"r1"}
    remember(known, "RUN", run_state("r1", status="FINISHED"))
    assert known.active_runs == set()


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_ended_runs_are_not_active(status: str) -> None:
    known = Known()
    remember(known, "RUN", run_state("r1", status="RUNNING"))
    remember(known, "RUN", run_state("r1", status=status))
    assert "r1" not in known.active_runs


def test_a_deleted_active_run_is_no_longer_active() -> None:
    known = Known()
    remember(known, "RUN", run_state("r1", status="RUNNING"))
    known.remember("RUN", run_key("r1"), None)
    assert known.active_runs == set() and known.fingerprints == {}


# ---- Known: model versions ----------------------------------------------------------------------


def test_a_version_is_linked_to_its_model_and_its_run() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r1"))
    remember(known, "MODEL_VERSION", version_state("m", "2", run_id="r1"))
    remember(known, "MODEL_VERSION", version_state("other", "1", run_id="r2"))
    assert known.versions_by_model == {"m": {"1", "2"}, "other": {"1"}}
    assert known.versions_by_run == {"r1": {("m", "1"), ("m", "2")}, "r2": {("other", "1")}}
    assert known.run_of_version == {("m", "1"): "r1", ("m", "2"): "r1", ("other", "1"): "r2"}
    refs = known.refs_of_run("r1")
    assert len(refs) == 2 and {(r["name"], r["version"]) for r in refs} == {("m", "1"), ("m", "2")}
    assert known.refs_of_run("r2") == [{"name": "other", "version": "1"}]
    assert known.refs_of_run("no such run") == []


def test_a_version_moved_to_another_run_leaves_the_first() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r1"))
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r2"))
    assert known.refs_of_run("r1") == []
    assert known.refs_of_run("r2") == [{"name": "m", "version": "1"}]
    assert known.run_of_version == {("m", "1"): "r2"}
    assert known.versions_by_model == {"m": {"1"}}


def test_a_version_without_a_run_belongs_to_no_run() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r1"))
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id=None))
    assert known.refs_of_run("r1") == []
    assert ("m", "1") not in known.run_of_version
    assert known.versions_by_model == {"m": {"1"}}


def test_a_deleted_version_is_forgotten_everywhere() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r1"))
    remember(known, "MODEL_VERSION", version_state("m", "2", run_id="r1"))
    key = model_version_key("m", "1")
    known.remember("MODEL_VERSION", key, None)
    assert key not in known.fingerprints and key not in known.version_own
    assert known.versions_by_model == {"m": {"2"}}
    assert known.refs_of_run("r1") == [{"name": "m", "version": "2"}]
    assert ("m", "1") not in known.run_of_version
    assert model_version_key("m", "2") in known.fingerprints and model_version_key("m", "2") in known.version_own


def test_deleting_an_unknown_version_is_harmless() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("m", "1", run_id="r1"))
    before = copy.deepcopy(known)
    known.remember("MODEL_VERSION", model_version_key("m", "9"), None)
    known.remember("MODEL_VERSION", model_version_key("unknown", "1"), None)
    assert known == before


def test_model_names_with_slashes_are_split_at_the_last_one() -> None:
    known = Known()
    remember(known, "MODEL_VERSION", version_state("team/sub/model", "12", run_id="r1"))
    assert known.versions_by_model == {"team/sub/model": {"12"}}
    assert known.refs_of_run("r1") == [{"name": "team/sub/model", "version": "12"}]
    known.remember("MODEL_VERSION", model_version_key("team/sub/model", "12"), None)
    assert known.versions_by_model == {} and known.refs_of_run("r1") == []  # nothing left behind


def test_version_own_fingerprint_ignores_what_the_version_draws_from_its_model_and_run() -> None:
    plain = version_state("m", "1", run_id="r1")
    with_alias = version_state("m", "1", run_id="r1", aliases=["champion"])
    other_run_content = changes.model_version_state(
        mo.model_version("m", "1", run_id="r1"), [],
        changes.run_summary(run_state("r1", params={"learning_rate": "0.5"})))
    assert fingerprint(plain) != fingerprint(with_alias) != fingerprint(other_run_content)
    assert version_own_fingerprint(plain) == version_own_fingerprint(with_alias)
    assert version_own_fingerprint(plain) == version_own_fingerprint(other_run_content)
    assert version_own_fingerprint(plain) != version_own_fingerprint(version_state("m", "1", description="new"))
    assert version_own_fingerprint(plain) != version_own_fingerprint(version_state("m", "1", tags={"a": "b"}))
    assert version_own_fingerprint(plain) != version_own_fingerprint(version_state("m", "1", stage="Archived"))


def test_version_own_fingerprint_leaves_the_state_as_it_was() -> None:
    state = version_state("m", "1", aliases=["champion"])
    before = copy.deepcopy(state)
    version_own_fingerprint(state)
    assert state == before


def test_remembered_version_keeps_its_own_fingerprint() -> None:
    known = Known()
    state = version_state("m", "1", aliases=["champion"])
    remember(known, "MODEL_VERSION", state)
    key = model_version_key("m", "1")
    assert known.version_own == {key: version_own_fingerprint(state)}
    assert known.fingerprints[key] == fingerprint(state)
    assert known.fingerprints[key] != known.version_own[key]
    # An alias moved: the published state changed, the version's own fields did not.
    moved = version_state("m", "1")
    assert known.changed("MODEL_VERSION", moved)
    assert known.version_own[key] == version_own_fingerprint(moved)
