"""The consumer's decisions (connector/state.py): aspect dedupe, ownership of primary URNs, soft
deletes at DELETE events, renames and the end of a complete snapshot, and the fail-safe. Pure: no I/O.

The `feed` helper dispatches an event exactly as the consumer does (markers, DELETE, entity
events through `mapping.to_mcps`) and applies the outcome to the partition state."""

from __future__ import annotations

from typing import Any

import pytest
from datahub.emitter.mcp import MetadataChangeProposalWrapper

from connector.contract import envelope
from connector.contract.events import ChangeEvent, EntityKind, experiment_key, model_version_key
from connector.datahub.decisions import SNAPSHOT_KEY, Decider, Entries, Entry, Outcome, PartitionState, Policy
from connector.datahub.mapping import (
    MappingSettings,
    experiment_urn,
    model_group_urn,
    model_urn,
    run_urn,
    stage_tag_urn,
    to_mcps,
)
from connector.mlflow import entities as changes
from tests import mlflow_objects as mo

SETTINGS = MappingSettings()
DELETES = Policy(enabled=True)
NO_STATE = Policy(enabled=False)
KEEP_STALE = Policy(enabled=True, remove_stale_metadata=False)

# ---- helpers ----------------------------------------------------------------------------------


def read(kind: EntityKind, state: Any, snapshot_id: str | None = None, op: str = "READ") -> ChangeEvent:
    source = envelope.source_block(mo.TRACKING_URI, mo.TRACKING_URI, mo.READ_AT_MS, snapshot_id)
    return envelope.entity_changed(op, kind, state, source, mo.READ_AT_MS + 1)  # type: ignore[arg-type]


def experiment(experiment_id: str, name: str | None = None, lifecycle_stage: str = "active",
               tags: dict[str, str] | None = None) -> ChangeEvent:
    return read("EXPERIMENT", changes.experiment_state(
        mo.experiment(experiment_id, name or f"experiment {experiment_id}", lifecycle_stage=lifecycle_stage,
                      tags=tags)))


def run(run_id: str, lifecycle_stage: str = "active") -> ChangeEvent:
    return read("RUN", changes.run_state(mo.run(run_id, lifecycle_stage=lifecycle_stage), "experiment 1", []))


def version(name: str, number: str, stage: str = "None") -> ChangeEvent:
    return read("MODEL_VERSION", changes.model_version_state(mo.model_version(name, number, stage=stage), [], None))


def registered_model(name: str) -> ChangeEvent:
    return read("REGISTERED_MODEL", changes.registered_model_state(mo.registered_model(name)))


def gone(key: str) -> ChangeEvent:
    source = envelope.source_block(mo.TRACKING_URI, mo.TRACKING_URI, mo.READ_AT_MS)
    from connector.contract.events import kind_of_key

    return envelope.entity_deleted(key, kind_of_key(key), source, mo.READ_AT_MS + 1)


def feed(state: PartitionState, policy: Policy, event: ChangeEvent) -> Outcome:
    """Decide one event as the consumer does, and apply the state changes."""
    decider = Decider(state, policy)
    if event["kind"] == "SNAPSHOT":
        marker = event["after"]
        assert marker is not None
        if event["op"] == "SNAPSHOT_BEGIN":
            outcome = decider.snapshot_begin(marker["snapshot_id"])  # type: ignore[typeddict-item]
        else:
            outcome = decider.snapshot_end(marker["snapshot_id"], marker["complete"])  # type: ignore[typeddict-item]
    elif event["op"] == "DELETE":
        outcome = decider.deleted(event)
    else:
        entity = to_mcps(event, SETTINGS).entity
        assert entity is not None
        outcome = decider.entity(event, entity)
    state.apply(outcome.state)
    return outcome


def marker(op: str, snapshot_id: str, complete: bool = True) -> ChangeEvent:
    source = envelope.source_block(mo.TRACKING_URI, mo.TRACKING_URI, mo.READ_AT_MS, snapshot_id)
    return envelope.snapshot_marker(op, snapshot_id, 3, source, mo.READ_AT_MS, complete, 0)  # type: ignore[arg-type]


def snapshot(state: PartitionState, policy: Policy, snapshot_id: str, events: list[ChangeEvent],
             complete: bool = True, begin: bool = True) -> Outcome:
    """BEGIN, the events, END; returns the END marker's outcome."""
    if begin:
        feed(state, policy, marker("SNAPSHOT_BEGIN", snapshot_id))
    for event in events:
        feed(state, policy, event)
    return feed(state, policy, marker("SNAPSHOT_END", snapshot_id, complete))


def written(outcome: Outcome) -> list[tuple[str, str, Any]]:
    return [(str(m.entityUrn), str(m.aspectName), m.aspect.to_obj() if m.aspect else None) for m in outcome.mcps]


def soft_deleted(outcome: Outcome) -> list[str]:
    return [urn for urn, aspect, value in written(outcome) if aspect == "status" and value == {"removed": True}]


def exp_urn(experiment_id: str) -> str:
    return experiment_urn(f"experiment {experiment_id}")


def status_of(outcome: Outcome, urn: str) -> list[Any]:
    return [value for u, aspect, value in written(outcome) if u == urn and aspect == "status"]


# ---- dedupe -----------------------------------------------------------------------------------


def test_unchanged_aspects_are_not_written_again() -> None:
    state = PartitionState()
    first = feed(state, DELETES, version("m", "1"))
    assert first.skipped == 0 and len(first.mcps) > 0
    again = feed(state, DELETES, version("m", "1"))
    assert again.mcps == [] and again.skipped == len(first.mcps)
    assert again.state == {}, "nothing changed, so nothing goes to the state topic"


def test_only_the_changed_aspect_is_written() -> None:
    state = PartitionState()
    feed(state, DELETES, experiment("1", tags={"team": "search"}))
    changed = feed(state, DELETES, experiment("1", tags={"team": "ranking"}))
    assert [aspect for _, aspect, _ in written(changed)] == ["containerProperties"]
    assert list(changed.state) == [exp_urn("1")]


def test_shared_urns_are_written_once_per_partition_and_not_owned() -> None:
    state = PartitionState()
    feed(state, DELETES, version("m", "1", "Production"))
    second = feed(state, DELETES, version("m", "2", "Staging"))
    tag_mcps = [(u, a) for u, a, _ in written(second) if u.startswith("urn:li:tag:")]
    assert tag_mcps == [], "stage tags were written by the first version already"
    assert state.entries[stage_tag_urn("production")].owner is None
    assert state.entries[model_urn("m", "2", SETTINGS)].owner == model_version_key("m", "2")
    assert stage_tag_urn("production") not in second.state, "unchanged shared entries are not rewritten"


def test_state_survives_serialisation_like_a_restart() -> None:
    """What the state topic holds (Entry JSON records, tombstones) rebuilds the same decisions."""
    live = PartitionState()
    records: list[tuple[str, bytes | None]] = []
    for event in (marker("SNAPSHOT_BEGIN", "s1"), experiment("1"), experiment("2"), version("m", "1"),
                  marker("SNAPSHOT_END", "s1"), gone(experiment_key("2"))):
        outcome = feed(live, DELETES, event)
        records += [(urn, e.to_json() if e is not None else None) for urn, e in outcome.state.items()]
    restored = PartitionState()
    for urn, value in records:
        restored.apply({urn: Entry.from_json(value) if value is not None else None})
    assert restored.entries == live.entries
    assert restored.open_snapshot is None and SNAPSHOT_KEY not in restored.entries
    assert feed(restored, DELETES, experiment("1")).mcps == []
    assert feed(restored, DELETES, version("m", "1")).mcps == []
    assert soft_deleted(feed(restored, DELETES, gone(experiment_key("1")))) == [exp_urn("1")]
    # The experiment deleted before the restart comes back: written in full again.
    assert status_of(feed(restored, DELETES, experiment("2")), exp_urn("2")) == [{"removed": False}]


def test_open_snapshot_survives_a_restart() -> None:
    live = PartitionState()
    begin = feed(live, DELETES, marker("SNAPSHOT_BEGIN", "s9"))
    assert begin.state == {SNAPSHOT_KEY: Entry(seen="s9")}
    restored = PartitionState()
    restored.apply({k: Entry.from_json(v.to_json()) if v else None for k, v in begin.state.items()})
    assert restored.open_snapshot == "s9"


# ---- ownership and renames --------------------------------------------------------------------


def test_primary_urn_is_owned_by_its_key() -> None:
    state = PartitionState()
    feed(state, DELETES, run("r1"))
    entry = state.entries[run_urn("r1")]
    assert entry.owner == "run:r1" and not entry.removed
    # the run's user is shared
    assert all(e.owner is None for urn, e in state.entries.items() if urn != run_urn("r1"))


def test_renamed_experiment_soft_deletes_its_old_urn() -> None:
    state = PartitionState()
    feed(state, DELETES, experiment("7", "old name"))
    renamed = feed(state, DELETES, experiment("7", "new name"))
    old, new = experiment_urn("old name"), experiment_urn("new name")
    assert soft_deleted(renamed) == [old]
    assert renamed.state[old] is None, "the old URN's state is tombstoned"
    assert state.entries[new].owner == experiment_key("7")
    assert old not in state.entries
    assert status_of(renamed, new) == [{"removed": False}]
    template = next(m for m in renamed.mcps if m.entityUrn == new)
    removal = next(m for m in renamed.mcps if m.entityUrn == old)
    assert removal.systemMetadata == template.systemMetadata
    assert any("no longer maps to" in n for n in renamed.notes)
    # Renamed back: the first URN is written in full again, the second soft-deleted.
    back = feed(state, DELETES, experiment("7", "old name"))
    assert soft_deleted(back) == [new]
    assert status_of(back, old) == [{"removed": False}]


@pytest.mark.parametrize("policy", [NO_STATE, KEEP_STALE])
def test_rename_without_stale_removal_keeps_the_old_urn(policy: Policy) -> None:
    state = PartitionState()
    feed(state, policy, experiment("7", "old name"))
    renamed = feed(state, policy, experiment("7", "new name"))
    assert soft_deleted(renamed) == []
    assert state.entries[experiment_urn("old name")].owner == experiment_key("7")


# ---- entities MLflow marks deleted (mirrored, whatever the policy) ----------------------------


@pytest.mark.parametrize("policy", [DELETES, NO_STATE])
def test_experiment_deleted_and_restored_in_mlflow_is_mirrored(policy: Policy) -> None:
    state = PartitionState()
    feed(state, policy, experiment("3"))
    deleted = feed(state, policy, experiment("3", lifecycle_stage="deleted"))
    assert written(deleted) == [(exp_urn("3"), "status", {"removed": True})]
    assert state.entries[exp_urn("3")].removed is True
    assert state.entries[exp_urn("3")].owner == experiment_key("3"), "kept: MLflow can restore it"
    assert feed(state, policy, experiment("3", lifecycle_stage="deleted")).mcps == []
    restored = feed(state, policy, experiment("3"))
    assert written(restored) == [(exp_urn("3"), "status", {"removed": False})]
    assert state.entries[exp_urn("3")].removed is False


@pytest.mark.parametrize("policy", [DELETES, NO_STATE])
def test_run_deleted_and_restored_in_mlflow_is_mirrored(policy: Policy) -> None:
    state = PartitionState()
    feed(state, policy, run("r1"))
    assert status_of(feed(state, policy, run("r1", "deleted")), run_urn("r1")) == [{"removed": True}]
    assert state.entries[run_urn("r1")].removed
    assert status_of(feed(state, policy, run("r1")), run_urn("r1")) == [{"removed": False}]
    assert not state.entries[run_urn("r1")].removed


def test_entity_first_seen_deleted_is_written_removed() -> None:
    state = PartitionState()
    outcome = feed(state, DELETES, experiment("4", lifecycle_stage="deleted"))
    assert status_of(outcome, exp_urn("4")) == [{"removed": True}]
    assert state.entries[exp_urn("4")].removed


# ---- DELETE events ----------------------------------------------------------------------------


def test_delete_soft_deletes_a_model_version_and_its_stage_tag() -> None:
    state = PartitionState()
    feed(state, DELETES, version("m", "2", "Staging"))
    outcome = feed(state, DELETES, gone(model_version_key("m", "2")))
    urn = model_urn("m", "2", SETTINGS)
    assert written(outcome) == [(urn, "status", {"removed": True}), (urn, "globalTags", {"tags": []})]
    assert outcome.state == {urn: None}
    assert urn not in state.entries
    assert stage_tag_urn("staging") in state.entries, "shared stage tag untouched"
    assert feed(state, DELETES, gone(model_version_key("m", "2"))).mcps == [], "a second DELETE does nothing"


def test_delete_of_a_registered_model() -> None:
    state = PartitionState()
    feed(state, DELETES, registered_model("m"))
    outcome = feed(state, DELETES, gone("registered_model:m"))
    assert soft_deleted(outcome) == [model_group_urn("m", SETTINGS)]


def test_delete_of_an_unknown_key_does_nothing() -> None:
    outcome = feed(PartitionState(), DELETES, gone(run_urn("nope").replace("urn:li:dataProcessInstance:", "run:")))
    assert outcome.mcps == [] and outcome.state == {}


@pytest.mark.parametrize("policy, reason", [(NO_STATE, "enabled is false"),
                                            (KEEP_STALE, "remove_stale_metadata is false")])
def test_delete_without_stale_removal_deletes_nothing(policy: Policy, reason: str) -> None:
    state = PartitionState()
    feed(state, policy, version("m", "1"))
    before = dict(state.entries)
    outcome = feed(state, policy, gone(model_version_key("m", "1")))
    assert outcome.mcps == [] and outcome.state == {}
    assert state.entries == before
    assert len(outcome.notes) == 1 and reason in outcome.notes[0]


def test_delete_of_an_entity_mlflow_had_marked_deleted_only_forgets_it() -> None:
    """An experiment deleted in MLflow (already removed in DataHub), then purged: no second soft
    delete; its state is dropped so the state topic does not keep it forever."""
    state = PartitionState()
    feed(state, DELETES, experiment("5", lifecycle_stage="deleted"))
    outcome = feed(state, DELETES, gone(experiment_key("5")))
    assert outcome.mcps == []
    assert outcome.state == {exp_urn("5"): None}


def test_recreated_after_delete_is_written_in_full() -> None:
    state = PartitionState()
    first = feed(state, DELETES, version("m", "1"))
    feed(state, DELETES, gone(model_version_key("m", "1")))
    again = feed(state, DELETES, version("m", "1"))
    urn = model_urn("m", "1", SETTINGS)
    assert {a for u, a, _ in written(again) if u == urn} == {a for u, a, _ in written(first) if u == urn}
    assert status_of(again, urn) == [{"removed": False}]


# ---- end of a complete snapshot ---------------------------------------------------------------


def populated(policy: Policy = DELETES, count: int = 4) -> PartitionState:
    state = PartitionState()
    snapshot(state, policy, "s1", [experiment(str(i)) for i in range(count)])
    return state


def test_snapshot_end_soft_deletes_what_it_did_not_see() -> None:
    state = populated()
    end = snapshot(state, DELETES, "s2", [experiment("0"), experiment("1")])
    assert soft_deleted(end) == [exp_urn("2"), exp_urn("3")]
    assert end.state == {SNAPSHOT_KEY: None, exp_urn("2"): None, exp_urn("3"): None}
    assert state.open_snapshot is None
    assert {exp_urn("0"), exp_urn("1")} <= set(state.entries) and exp_urn("2") not in state.entries
    # The next snapshot, same content: nothing more to delete.
    assert snapshot(state, DELETES, "s3", [experiment("0"), experiment("1")]).mcps == []


def test_snapshot_end_seeing_everything_deletes_nothing() -> None:
    state = populated()
    end = snapshot(state, DELETES, "s2", [experiment(str(i)) for i in range(4)])
    assert end.mcps == [] and end.notes == []


def test_first_snapshot_after_stream_deletes_entities_created_between_snapshots_only_if_gone() -> None:
    state = populated()
    feed(state, DELETES, experiment("9"))  # a CREATE between snapshots, then gone from MLflow
    end = snapshot(state, DELETES, "s2", [experiment(str(i)) for i in range(4)])
    assert soft_deleted(end) == [exp_urn("9")]


def test_an_update_inside_the_open_snapshot_counts_as_seen() -> None:
    state = populated()
    feed(state, DELETES, marker("SNAPSHOT_BEGIN", "s2"))
    for i in range(3):
        feed(state, DELETES, experiment(str(i)))
    feed(state, DELETES, read("EXPERIMENT", changes.experiment_state(mo.experiment("3", "experiment 3")),
                              op="UPDATE"))
    assert feed(state, DELETES, marker("SNAPSHOT_END", "s2")).mcps == []


def test_snapshot_end_of_another_snapshot_deletes_nothing() -> None:
    state = populated()
    feed(state, DELETES, marker("SNAPSHOT_BEGIN", "s2"))
    feed(state, DELETES, experiment("0"))
    end = feed(state, DELETES, marker("SNAPSHOT_END", "s-other"))
    assert end.mcps == []
    assert end.state == {SNAPSHOT_KEY: None}
    assert "without its beginning" in end.notes[0]


def test_snapshot_end_without_begin_deletes_nothing() -> None:
    state = populated()
    end = snapshot(state, DELETES, "s2", [experiment("0")], begin=False)
    assert end.mcps == [] and "without its beginning" in end.notes[0]


def test_incomplete_snapshot_deletes_nothing() -> None:
    state = populated()
    end = snapshot(state, DELETES, "s2", [experiment("0")], complete=False)
    assert end.mcps == [] and end.state == {SNAPSHOT_KEY: None}
    assert "incomplete" in end.notes[0]
    assert len([e for e in state.entries.values() if e.owner]) == 4
    # and the entities it did not see are still known: a later complete snapshot decides
    assert soft_deleted(snapshot(state, DELETES, "s3", [experiment(str(i)) for i in range(3)])) == [exp_urn("3")]


@pytest.mark.parametrize("policy", [NO_STATE, KEEP_STALE])
def test_snapshot_end_without_stale_removal_deletes_nothing(policy: Policy) -> None:
    state = populated(policy)
    end = snapshot(state, policy, "s2", [experiment("0")])
    assert end.mcps == [] and end.state == {SNAPSHOT_KEY: None}
    assert len([e for e in state.entries.values() if e.owner]) == 4


def test_more_than_the_fail_safe_threshold_deletes_nothing() -> None:
    state = populated()
    end = snapshot(state, DELETES, "s2", [])  # 4 of 4 gone: 100%
    assert end.mcps == []
    assert end.state == {SNAPSHOT_KEY: None}
    assert end.notes == [] and len(end.warnings) == 1 and "4 of 4 entities (100%)" in end.warnings[0]
    assert "fail_safe_threshold 75%" in end.warnings[0] and "nothing deleted" in end.warnings[0]
    assert len([e for e in state.entries.values() if e.owner]) == 4, "entities carried over"


def test_exactly_the_fail_safe_threshold_is_allowed() -> None:
    """The original skips only when *more than* fail_safe_threshold percent would go."""
    state = populated()
    end = snapshot(state, DELETES, "s2", [experiment("0")])  # 3 of 4: exactly 75%
    assert soft_deleted(end) == [exp_urn("1"), exp_urn("2"), exp_urn("3")]


@pytest.mark.parametrize("threshold, deleted", [(74.9, False), (75.0, True), (100.0, True), (0.0, False)])
def test_fail_safe_threshold_boundary(threshold: float, deleted: bool) -> None:
    policy = Policy(enabled=True, fail_safe_threshold=threshold)
    state = populated(policy)
    end = snapshot(state, policy, "s2", [experiment("0")])
    assert bool(soft_deleted(end)) is deleted


def test_zero_threshold_still_allows_a_snapshot_with_nothing_gone() -> None:
    policy = Policy(enabled=True, fail_safe_threshold=0.0)
    state = populated(policy)
    assert snapshot(state, policy, "s2", [experiment(str(i)) for i in range(4)]).notes == []


def test_entities_already_removed_are_not_counted() -> None:
    """Experiments MLflow marked deleted (already removed in DataHub) are neither soft-deleted again
    nor counted for the fail-safe: 3 of 4 live ones gone is exactly 75%, allowed; counting the two
    removed ones as stale would make it 5 of 6 (83%) and block it."""
    state = PartitionState()
    snapshot(state, DELETES, "s1", [experiment(str(i)) for i in range(4)]
             + [experiment("8", lifecycle_stage="deleted"), experiment("9", lifecycle_stage="deleted")])
    end = snapshot(state, DELETES, "s2", [experiment("0")])
    assert soft_deleted(end) == [exp_urn("1"), exp_urn("2"), exp_urn("3")]
    # the removed ones the snapshot did not see (purged from MLflow) are forgotten, with no MCP
    assert end.state[exp_urn("8")] is None and end.state[exp_urn("9")] is None


def test_removed_entities_still_in_mlflow_are_kept() -> None:
    state = PartitionState()
    snapshot(state, DELETES, "s1", [experiment("0"), experiment("8", lifecycle_stage="deleted")])
    end = snapshot(state, DELETES, "s2", [experiment("0"), experiment("8", lifecycle_stage="deleted")])
    assert end.mcps == [] and end.state == {SNAPSHOT_KEY: None}
    assert state.entries[exp_urn("8")].removed
    assert status_of(feed(state, DELETES, experiment("8")), exp_urn("8")) == [{"removed": False}]


def test_fail_safe_with_only_removed_entities_known() -> None:
    state = PartitionState()
    snapshot(state, DELETES, "s1", [experiment("8", lifecycle_stage="deleted")])
    end = snapshot(state, DELETES, "s2", [])
    assert end.mcps == [] and end.state == {SNAPSHOT_KEY: None, exp_urn("8"): None}


def test_shared_urns_are_never_soft_deleted() -> None:
    state = PartitionState()
    snapshot(state, DELETES, "s1", [version("m", "1", "Production"), version("m", "2", "Staging"),
                                    version("m", "3", "Staging"), version("m", "4", "Staging")])
    end = snapshot(state, DELETES, "s2", [version("m", "2", "Staging")])
    assert soft_deleted(end) == [model_urn("m", n, SETTINGS) for n in ("1", "3", "4")]
    assert all(not urn.startswith("urn:li:tag:") for urn in soft_deleted(end))
    assert all(e.owner is None for urn, e in state.entries.items() if urn.startswith("urn:li:tag:"))
    # the versions soft-deleted also lose their stage tag association
    gone_urn = model_urn("m", "1", SETTINGS)
    assert (gone_urn, "globalTags", {"tags": []}) in written(end)


def test_snapshot_markers_of_many_snapshots() -> None:
    state = populated()
    for n in range(2, 5):
        end = snapshot(state, DELETES, f"s{n}", [experiment(str(i)) for i in range(4)])
        assert end.mcps == []
    assert soft_deleted(snapshot(state, DELETES, "s5", [experiment(str(i)) for i in range(1, 4)])) == [exp_urn("0")]


# ---- the owner index --------------------------------------------------------------------------


def test_owner_index_follows_direct_writes_and_pops() -> None:
    """The consumer's rollback writes and pops `entries` directly; lookups stay right."""
    entries = Entries()
    entries["u1"] = Entry(owner="k")
    entries["u2"] = Entry(owner="k", removed=True)
    assert entries.owned_by("k") == ["u1", "u2"]
    entries.pop("u1")
    assert entries.owned_by("k") == ["u2"]
    entries["u2"] = Entry(owner="other")
    assert entries.owned_by("k") == [] and entries.owned_by("other") == ["u2"]
    entries.update({"u3": Entry(owner="k")})
    entries.setdefault("u4", Entry(owner="k"))
    assert entries.owned_by("k") == ["u3", "u4"]


def test_partition_state_from_a_plain_dict_is_indexed() -> None:
    state = PartitionState(entries={"u1": Entry(owner="k"), "u2": Entry(owner="k", removed=True)})
    assert isinstance(state.entries, Entries)
    assert state.owned_by("k") == ["u1"]
    assert state.owned_by("k", removed=True) == ["u2"]


def test_entry_json_round_trip() -> None:
    entry = Entry(owner="run:r1", aspects={"status": "abc"}, seen="s1", removed=True)
    assert Entry.from_json(entry.to_json()) == entry
    assert Entry.from_json(b"{}") == Entry()


def test_soft_delete_mcps_are_well_formed() -> None:
    state = PartitionState()
    feed(state, DELETES, version("m", "1"))
    for mcp in feed(state, DELETES, gone(model_version_key("m", "1"))).mcps:
        assert isinstance(mcp, MetadataChangeProposalWrapper)
        assert mcp.changeType == "UPSERT" and mcp.aspect is not None and mcp.aspect.validate()


def test_an_entity_whose_event_cannot_be_written_still_counts_as_seen() -> None:
    """The consumer dead-letters an event it cannot write (too large, not serialisable); the entity is
    still in MLflow, so the snapshot's end must not soft-delete what its key owns."""
    from connector.datahub.decisions import still_seen

    state = populated()
    feed(state, DELETES, marker("SNAPSHOT_BEGIN", "s2"))
    for event in [experiment("0"), experiment("1"), experiment("2")]:
        feed(state, DELETES, event)
    unwritable = experiment("3")
    kept = still_seen(unwritable, state)
    assert set(kept) == {exp_urn("3")} and kept[exp_urn("3")].seen == "s2"  # type: ignore[union-attr]
    state.apply(kept)
    end = feed(state, DELETES, marker("SNAPSHOT_END", "s2"))
    assert soft_deleted(end) == []
    # Outside a snapshot, or for a DELETE, there is nothing to keep.
    assert still_seen(experiment("3"), state) == {}
    assert still_seen(gone(experiment_key("3")), state) == {}


def test_the_owner_index_forgets_what_is_deleted() -> None:
    """Weeks of churn: entities created and deleted leave nothing behind in the state's index."""
    state = PartitionState()
    for round_ in range(20):
        snapshot(state, DELETES, f"s{round_}", [experiment(str(round_))])
    assert set(state.entries) == {exp_urn("19")}
    assert isinstance(state.entries, Entries)
    assert list(state.entries.by_owner) == [experiment_key("19")]
    state.entries.pop(exp_urn("19"))
    assert state.entries.by_owner == {} and state.entries.pop("urn:li:absent", None) is None
