"""What the consumer knows to exist in DataHub, per change-topic partition, and the decisions made
from it. Pure: events and MCPs in, MCPs to write and state changes out.

For every URN the connector wrote, the state holds the fingerprint of each aspect last written
(so an unchanged aspect is not written again), the change key that owns it (for the entity's
primary URN, and the other URNs its key owns: a registered model's features; shared URNs such as
stage tags, users and datasets have no owner and are never soft-deleted), the last complete
snapshot that saw it, and whether it is soft-deleted.

Soft deletes decided here (an entity gone from MLflow, a renamed experiment's old URN, an entity
a complete snapshot did not see) write `status {removed: true}` (plus what depends on the entity,
see `mapping.removal_mcps`) and a tombstone for the URN's state. An experiment or run that MLflow
itself marks deleted is not a deletion decided here: its `status` mirrors MLflow's lifecycle stage
(`removed` in the state), whatever `stateful_ingestion` says.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import SystemMetadataClass

from connector.contract.events import ChangeEvent, SnapshotMarker
from connector.datahub.aspects import generic_aspect
from connector.datahub.mapping import EntityMcps, MappingSettings, removal_mcp, removal_mcps, to_mcps

SNAPSHOT_KEY = "__snapshot__"
FEATURE_URN_PREFIX = "urn:li:mlFeature:"


@dataclass(frozen=True)
class Entry:
    owner: str | None = None
    aspects: dict[str, str] = field(default_factory=dict)
    seen: str | None = None
    removed: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"owner": self.owner, "aspects": self.aspects, "seen": self.seen,
                           "removed": self.removed}, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Entry:
        d = json.loads(data)
        return Entry(owner=d.get("owner"), aspects=dict(d.get("aspects") or {}), seen=d.get("seen"),
                     removed=bool(d.get("removed")))


class Entries(dict[str, Entry]):
    """URN -> entry, with an index of the URNs each owner (change key) ever had, so that finding
    what a key owns does not scan the whole partition for every event. The index may hold URNs
    that were removed or re-owned since: lookups check the entry itself."""

    def __init__(self, items: Mapping[str, Entry] | Iterable[tuple[str, Entry]] = ()) -> None:
        super().__init__()
        self.by_owner: dict[str, dict[str, None]] = {}
        self.update(items)

    def __setitem__(self, urn: str, entry: Entry) -> None:
        super().__setitem__(urn, entry)
        if entry.owner:
            self.by_owner.setdefault(entry.owner, {})[urn] = None

    def update(self, *args: object, **kwargs: Entry) -> None:  # type: ignore[override]
        for urn, entry in dict(*args, **kwargs).items():  # type: ignore[call-overload]
            self[urn] = entry

    def __delitem__(self, urn: str) -> None:
        entry = self[urn]
        super().__delitem__(urn)
        self._unindex(urn, entry)

    def pop(self, urn: str, *default: Entry | None) -> Entry | None:  # type: ignore[override]
        if urn not in self:
            if default:
                return default[0]
            raise KeyError(urn)
        entry = self[urn]
        del self[urn]
        return entry

    def _unindex(self, urn: str, entry: Entry) -> None:
        """A URN that is gone leaves its owner's index, and an owner with nothing left leaves it too:
        weeks of churn (entities created and deleted) do not grow the index."""
        if entry.owner and entry.owner in self.by_owner:
            urns = self.by_owner[entry.owner]
            urns.pop(urn, None)
            if not urns:
                del self.by_owner[entry.owner]

    def setdefault(self, urn: str, default: Entry) -> Entry:  # type: ignore[override]
        if urn not in self:
            self[urn] = default
        return self[urn]

    def owned_by(self, owner: str) -> list[str]:
        urns = self.by_owner.get(owner)
        if not urns:
            return []
        live = [urn for urn in urns if (e := self.get(urn)) is not None and e.owner == owner]
        if not live:
            del self.by_owner[owner]
        elif len(live) != len(urns):
            self.by_owner[owner] = dict.fromkeys(live)
        return live


SHARED_MEMO_LIMIT = 10_000


@dataclass
class PartitionState:
    """State of one partition. `open_snapshot` is the snapshot whose BEGIN marker was read and
    whose END marker was not yet. `shared_fingerprints` is a cache, not state: for URNs that many
    events carry (stage tags, users, datasets), (URN, aspect) -> (the aspect's repr, its
    fingerprint), so that an aspect rebuilt unchanged by the next event is not serialised again."""

    entries: dict[str, Entry] = field(default_factory=Entries)
    open_snapshot: str | None = None
    shared_fingerprints: dict[tuple[str, str], tuple[str, str]] = field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.entries, Entries):
            self.entries = Entries(self.entries)

    def owned_by(self, owner: str, removed: bool = False) -> list[str]:
        """The URNs a change key owns that are live (or, with removed=True, soft-deleted)."""
        assert isinstance(self.entries, Entries)
        return [urn for urn in self.entries.owned_by(owner) if self.entries[urn].removed == removed]

    def apply(self, changes: dict[str, Entry | None]) -> None:
        for urn, entry in changes.items():
            if urn == SNAPSHOT_KEY:
                self.open_snapshot = entry.seen if entry is not None else None
            elif entry is None:
                self.entries.pop(urn, None)
            else:
                self.entries[urn] = entry


@dataclass(frozen=True)
class Policy:
    """`stateful_ingestion` of the recipe: whether, and how carefully, to soft-delete."""

    enabled: bool = False
    remove_stale_metadata: bool = True
    fail_safe_threshold: float = 75.0

    @property
    def deletes(self) -> bool:
        return self.enabled and self.remove_stale_metadata

    def why_no_deletes(self) -> str:
        return ("stateful_ingestion.enabled is false" if not self.enabled
                else "stateful_ingestion.remove_stale_metadata is false")


@dataclass
class Outcome:
    """What to write for one event: MCPs, and state changes (None = tombstone)."""

    mcps: list[MetadataChangeProposalWrapper] = field(default_factory=list)
    state: dict[str, Entry | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was decided, for an INFO line
    warnings: list[str] = field(default_factory=list)  # what was refused or cut, for a WARNING line
    skipped: int = 0


def aspect_fingerprint(mcp: MetadataChangeProposalWrapper) -> str:
    """Fingerprint of the aspect exactly as it travels in the MCP (its serialisation is computed
    once and reused to write the MCP)."""
    body = generic_aspect(mcp).value
    return hashlib.sha256(str(mcp.aspectName).encode() + b":" + (body if isinstance(body, bytes) else body.encode())
                          ).hexdigest()[:24]


# A soft delete's status aspect is the same for every URN.
_REMOVED = aspect_fingerprint(removal_mcp("urn:li:corpuser:any"))


def shared_aspect_fingerprint(mcp: MetadataChangeProposalWrapper,
                              memo: dict[tuple[str, str], tuple[str, str]]) -> str:
    """`aspect_fingerprint`, remembered per (URN, aspect) for URNs that are part of many events.
    The aspect's repr names every value with its type (1, 1.0 and True differ), so an equal repr
    is an equal serialisation; a different one (even a reordered map) is serialised again."""
    key = (str(mcp.entityUrn), str(mcp.aspectName))
    text = repr(mcp.aspect)
    hit = memo.get(key)
    if hit is not None and hit[0] == text:
        return hit[1]
    fp = aspect_fingerprint(mcp)
    if len(memo) >= SHARED_MEMO_LIMIT:
        memo.clear()
    memo[key] = (text, fp)
    return fp


class Decider:
    """Applies events to one partition's state and says what to write."""

    def __init__(self, partition: PartitionState, policy: Policy) -> None:
        self.partition = partition
        self.policy = policy

    def _current(self, urn: str, outcome: Outcome) -> Entry | None:
        if urn in outcome.state:
            return outcome.state[urn]
        return self.partition.entries.get(urn)

    def _soft_delete(self, urn: str, template: MetadataChangeProposalWrapper | None, outcome: Outcome) -> None:
        for mcp in removal_mcps(urn):
            if template is not None:
                mcp.systemMetadata = template.systemMetadata
            outcome.mcps.append(mcp)
        outcome.state[urn] = None

    def _forget(self, urns: Iterable[str], outcome: Outcome) -> None:
        """Drop the state of URNs that are already soft-deleted in DataHub (no MCP needed)."""
        for urn in urns:
            outcome.state[urn] = None

    def entity(self, event: ChangeEvent, entity: EntityMcps) -> Outcome:
        """An entity's new state: write the aspects that changed, own its primary URN, and
        soft-delete a primary URN the key owned before but no longer maps to (a renamed
        experiment keeps its id but changes its URN)."""
        outcome = Outcome()
        key = event["key"]
        open_snapshot = self.partition.open_snapshot
        owned = {entity.primary_urn, *entity.owned_urns}  # a registered model owns its features too
        for mcp in entity.mcps:
            urn = str(mcp.entityUrn)
            current = self._current(urn, outcome) or Entry()
            fp = (aspect_fingerprint(mcp) if urn in owned
                  else shared_aspect_fingerprint(mcp, self.partition.shared_fingerprints))
            aspects = current.aspects
            if aspects.get(str(mcp.aspectName)) == fp:
                outcome.skipped += 1
            else:
                outcome.mcps.append(mcp)
                aspects = {**aspects, str(mcp.aspectName): fp}
            if urn in owned:
                current = Entry(key, aspects, open_snapshot or current.seen, aspects.get("status") == _REMOVED)
            elif aspects is not current.aspects:
                current = Entry(current.owner, aspects, current.seen, current.removed)
            outcome.state[urn] = current
        # Only what changed goes to the state topic (shared URNs such as the stage tags are part of
        # many events and usually unchanged).
        for urn in [u for u, e in outcome.state.items() if e == self.partition.entries.get(u)]:
            del outcome.state[urn]
        if self.policy.deletes:
            previous = [u for u in self.partition.owned_by(key) if u not in owned]
            for urn in previous:
                outcome.notes.append(f"{key} no longer maps to {urn}: soft-deleted")
                self._soft_delete(urn, entity.mcps[0] if entity.mcps else None, outcome)
            self._forget([u for u in self.partition.owned_by(key, removed=True) if u not in owned], outcome)
        return outcome

    def deleted(self, event: ChangeEvent) -> Outcome:
        """The entity is gone from MLflow: soft-delete what its key owns."""
        outcome = Outcome()
        key = event["key"]
        if not self.policy.deletes:
            if self.partition.owned_by(key):
                outcome.notes.append(f"{key} is gone from MLflow; {self.policy.why_no_deletes()}: nothing deleted")
            return outcome
        for urn in self.partition.owned_by(key):
            outcome.notes.append(f"{key} is gone from MLflow: {urn} soft-deleted")
            self._soft_delete(urn, None, outcome)
        # Already soft-deleted (an experiment or run MLflow marked deleted, then purged): forget it.
        self._forget(self.partition.owned_by(key, removed=True), outcome)
        return outcome

    def snapshot_begin(self, snapshot_id: str) -> Outcome:
        return Outcome(state={SNAPSHOT_KEY: Entry(seen=snapshot_id)})

    def snapshot_end(self, snapshot_id: str, complete: bool) -> Outcome:
        """Soft-delete the entities this partition knows that the snapshot did not see, unless the
        snapshot is incomplete or not the one this partition saw begin, or more than
        fail_safe_threshold percent of the live entities would go."""
        outcome = Outcome(state={SNAPSHOT_KEY: None})
        if self.partition.open_snapshot != snapshot_id:
            outcome.notes.append(f"snapshot {snapshot_id} ended without its beginning in this partition: "
                                 "no stale-entity check")
            return outcome
        if not complete:
            outcome.notes.append(f"snapshot {snapshot_id} is incomplete: no stale-entity check")
            return outcome
        if not self.policy.deletes:
            return outcome
        owned = {urn: e for urn, e in self.partition.entries.items() if e.owner}
        known = {urn: e for urn, e in owned.items() if not e.removed}
        stale = sorted(urn for urn, e in known.items() if e.seen != snapshot_id)
        # The threshold counts MLflow objects, not the features a registered model owns (a model with
        # hundreds of inputs would otherwise weigh as hundreds of objects).
        objects = [urn for urn in known if not urn.startswith(FEATURE_URN_PREFIX)]
        stale_objects = [urn for urn in stale if not urn.startswith(FEATURE_URN_PREFIX)]
        if stale_objects:
            percent = 100.0 * len(stale_objects) / len(objects)
            if percent > self.policy.fail_safe_threshold:
                outcome.warnings.append(
                    f"snapshot {snapshot_id}: {len(stale_objects)} of {len(objects)} entities ({percent:.0f}%) "
                    "would be "
                    f"soft-deleted, more than fail_safe_threshold {self.policy.fail_safe_threshold:g}%: "
                    "nothing deleted")
                return outcome
        for urn in stale:
            outcome.notes.append(f"snapshot {snapshot_id} did not see {known[urn].owner}: {urn} soft-deleted")
            self._soft_delete(urn, None, outcome)
        self._forget(sorted(urn for urn, e in owned.items() if e.removed and e.seen != snapshot_id), outcome)
        return outcome


def still_seen(event: ChangeEvent, state: PartitionState) -> dict[str, Entry | None]:
    """State changes for an entity event that cannot be written (dead-lettered): the URNs its key owns
    count as seen by the open snapshot, so its end does not take the entity for gone. Pure."""
    snapshot = state.open_snapshot
    if snapshot is None or event["kind"] == "SNAPSHOT" or event["op"] == "DELETE":
        return {}
    return {urn: Entry(entry.owner, entry.aspects, snapshot, entry.removed)
            for urn in state.owned_by(event["key"]) if (entry := state.entries[urn]).seen != snapshot}


def decide(event: ChangeEvent, state: PartitionState, policy: Policy, settings: MappingSettings) -> Outcome:
    """What to write for one change event, given the state of its partition: the consumer's (and a
    replay's) whole decision, pure. Raises ValueError for an entity event without entity state."""
    decider = Decider(state, policy)
    if event["kind"] == "SNAPSHOT":
        marker: SnapshotMarker = event["after"]  # type: ignore[assignment]
        if event["op"] == "SNAPSHOT_BEGIN":
            return decider.snapshot_begin(marker["snapshot_id"])
        return decider.snapshot_end(marker["snapshot_id"], marker["complete"])
    if event["op"] == "DELETE":
        outcome = decider.deleted(event)
    elif event["kind"] == "LOGGED_MODEL":
        return Outcome()  # published for other consumers; no DataHub mapping (docs/compatibility.md)
    else:
        transformed = to_mcps(event, settings)
        if transformed.entity is None:
            raise ValueError(f"{event['op']} event of {event['key']} carries no entity state")
        outcome = decider.entity(event, transformed.entity)
        outcome.warnings.extend(transformed.warnings)
    # Soft deletes decided here carry the same system metadata as the event's own proposals.
    metadata = SystemMetadataClass(lastObserved=event["source"]["read_at_ms"], runId=settings.run_id)
    for mcp in outcome.mcps:
        if mcp.systemMetadata is None:
            mcp.systemMetadata = metadata
    return outcome
