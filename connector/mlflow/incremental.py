"""What changed in MLflow since the last cycle, read with watermarks where MLflow has them.

* experiments: all listed (one page holds 1,000; `search_runs` needs their ids anyway); those whose
  `last_update_time` is at or past the watermark changed, and so did their runs (a renamed or deleted
  experiment changes every run's event);
* registered models and model versions: ordered by `last_updated_timestamp`, newest first, read until
  the watermark; a changed model's versions are re-read (aliases travel on versions, and a version
  gone from a changed model was deleted);
* runs: new ones by `start_time` at or past the watermark, plus every run last seen active;
* dependants: the versions a changed run produced (they carry its params and metrics), the runs a
  changed version came from (they carry their versions).

MLflow changes that move no timestamp (tags and aliases in the registry, edits to finished runs,
hard deletes of whole models) are caught by webhooks where available and by the periodic
reconciliation. Watermarks overlap by a few seconds, so a write committed late is not skipped;
the producer's fingerprints keep the overlap from publishing anything twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run as MlflowRun
from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion

from connector.contract.envelope import fingerprint
from connector.contract.events import (
    Entity,
    EntityKind,
    ModelVersion,
    ModelVersionRef,
    RegisteredModel,
    RunSummary,
    entity_key,
    model_version_key,
    model_version_of_key,
    registered_model_key,
)
from connector.mlflow.entities import (
    NOT_READ,
    aliases_by_version,
    experiment_state,
    logged_model_state,
    model_version_state,
    registered_model_state,
    run_state,
    run_summary,
    with_features,
)
from connector.mlflow.reader import MlflowReader

if TYPE_CHECKING:
    from connector.mlflow.entities import SignatureRead
    from connector.mlflow.signatures import Signatures

OVERLAP_MS = 5000
CLOCK_SKEW_MS = 3600 * 1000  # how far behind the producer's clock a client's clock may be
FIRST_PAGE = 250  # covers the overlap (5 s) of a registry written 50 times a second
ACTIVE_STATUSES = ("RUNNING", "SCHEDULED")


@dataclass
class Watermarks:
    experiments: int | None = None
    registered_models: int | None = None
    model_versions: int | None = None
    runs: int | None = None
    logged_models: int | None = None

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def from_dict(d: dict[str, int]) -> Watermarks:
        return Watermarks(**{k: d.get(k) for k in ("experiments", "registered_models", "model_versions", "runs",
                                                    "logged_models")})

    def include(self, kind: EntityKind, entity: Entity) -> None:
        """Advance, in place, to one listed entity's own time (a run's: its start)."""
        name, time_field = _WATERMARK_OF[kind]
        value = entity.get(time_field)  # type: ignore[union-attr]
        if value is not None:
            current = getattr(self, name)
            if current is None or value > current:
                setattr(self, name, value)

    def advanced(self, other: Watermarks) -> Watermarks:
        def later(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else max(a, b)

        return Watermarks(*(later(getattr(self, k), getattr(other, k)) for k in self.__dict__))


# Per kind: the watermark it advances, and the field of its state that does it.
_WATERMARK_OF: dict[str, tuple[str, str]] = {
    "EXPERIMENT": ("experiments", "last_update_time"),
    "REGISTERED_MODEL": ("registered_models", "last_updated_timestamp"),
    "MODEL_VERSION": ("model_versions", "last_updated_timestamp"),
    "LOGGED_MODEL": ("logged_models", "last_updated_timestamp"),
    "RUN": ("runs", "start_time"),
}


def version_own_fingerprint(state: ModelVersion) -> str:
    """Fingerprint of a version's own MLflow fields, without what it draws from its model and run, and
    without its signature (read separately, once: connector/mlflow/signatures.py)."""
    own = {k: v for k, v in state.items() if k not in SIGNATURE_FIELDS}
    return fingerprint({**own, "aliases": [], "run": None})


SIGNATURE_FIELDS = ("signature_status", "signature_reason", "signature")


@dataclass
class Known:
    """What the producer has published, as far as change detection and the joins need it."""

    fingerprints: dict[str, str] = field(default_factory=dict)  # key -> fingerprint of the published state
    version_own: dict[str, str] = field(default_factory=dict)  # key -> version_own_fingerprint
    versions_by_run: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    run_of_version: dict[tuple[str, str], str] = field(default_factory=dict)
    versions_by_model: dict[str, set[str]] = field(default_factory=dict)
    active_runs: set[str] = field(default_factory=set)
    signatures: dict[str, SignatureRead] = field(default_factory=dict)  # version key -> its signature's read

    def changed(self, kind: EntityKind, entity: Entity) -> bool:
        return self.fingerprints.get(entity_key(kind, entity)) != fingerprint(entity)

    @staticmethod
    def summary(kind: EntityKind, entity: Entity) -> dict[str, Any]:
        """What a restart needs of a published state (kept in a compacted topic instead of the states):
        its fingerprint, and what change detection and the joins use."""
        out: dict[str, Any] = {"kind": kind, "fp": fingerprint(entity)}
        if kind == "RUN":
            out["active"] = entity["status"] in ACTIVE_STATUSES  # type: ignore[typeddict-item]
        elif kind == "MODEL_VERSION":
            out["own"] = version_own_fingerprint(entity)  # type: ignore[arg-type]
            out["run_id"] = entity["run_id"]  # type: ignore[typeddict-item]
            if entity.get("signature_status") is not None:  # read once per version ever: kept for restarts
                out["sig"] = {k: entity.get(k) for k in SIGNATURE_FIELDS}
        elif kind == "EXPERIMENT":
            out["name"] = entity["name"]  # type: ignore[typeddict-item]
        return out

    def remember(self, kind: EntityKind, key: str, entity: Entity | None) -> None:
        self.restore(kind, key, None if entity is None else self.summary(kind, entity))

    def restore(self, kind: EntityKind, key: str, summary: dict[str, Any] | None) -> None:
        """Take a published state's summary (None: the entity is gone, and everything about it goes too)."""
        if summary is None:
            self.fingerprints.pop(key, None)
        else:
            self.fingerprints[key] = summary["fp"]
        if kind == "RUN":
            run_id = key.split(":", 1)[1]
            if summary is not None and summary.get("active"):
                self.active_runs.add(run_id)
            else:
                self.active_runs.discard(run_id)
            if summary is None:
                self.versions_by_run.pop(run_id, None)
        elif kind == "MODEL_VERSION":
            name, _, version = key.split(":", 1)[1].rpartition("/")
            previous_run = self.run_of_version.pop((name, version), None)
            if previous_run is not None:
                _discard(self.versions_by_run, previous_run, (name, version))
            if summary is None:
                _discard(self.versions_by_model, name, version)
                self.version_own.pop(key, None)
                self.signatures.pop(key, None)
                return
            self.version_own[key] = summary["own"]
            if summary.get("sig"):
                self.signatures[key] = summary["sig"]
            else:
                self.signatures.pop(key, None)
            self.versions_by_model.setdefault(name, set()).add(version)
            run_id = summary.get("run_id")
            if run_id:
                self.versions_by_run.setdefault(run_id, set()).add((name, version))
                self.run_of_version[(name, version)] = run_id

    def signature_of(self, name: str, version: str) -> SignatureRead:
        return self.signatures.get(model_version_key(name, version), NOT_READ)

    def model_signatures(self, name: str) -> dict[str, Any]:
        """version -> signature (or None) of every published version of a registered model."""
        return {v: self.signature_of(name, v)["signature"] for v in self.versions_by_model.get(name, ())}

    def refs_of_run(self, run_id: str) -> list[ModelVersionRef]:
        return [{"name": n, "version": v} for n, v in sorted(self.versions_by_run.get(run_id, ()))]


def _discard(index: dict[Any, set[Any]], key: Any, item: Any) -> None:
    """Drop `item` from the set at `key`, and the key when its set is empty: deleted entities leave no trace."""
    items = index.get(key)
    if items is not None:
        items.discard(item)
        if not items:
            del index[key]


@dataclass
class ChangeSet:
    entities: list[tuple[EntityKind, Entity]] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)
    watermarks: Watermarks = field(default_factory=Watermarks)


def _first_page(mark: int | None) -> int | None:
    """With a watermark, a read newest first usually stops within a few items: a small first page
    keeps an idle cycle's cost independent of the store's size (full pages after it)."""
    return None if mark is None else FIRST_PAGE


def _since(mark: int | None, overlap_ms: int) -> int:
    return 0 if mark is None else mark - overlap_ms


def _newest_first(pages: Iterable[list], since: int | None, attr: str) -> list:
    """Items of pages ordered newest first, until one is older than `since`."""
    found = []
    for page in pages:
        for item in page:
            if since is not None and (getattr(item, attr) or 0) < since:
                return found
            found.append(item)
    return found


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def read_changes(reader: MlflowReader, marks: Watermarks, known: Known, overlap_ms: int = OVERLAP_MS,
                 now_ms: int | None = None, clock_skew_ms: int = CLOCK_SKEW_MS,
                 signatures: Signatures | None = None) -> ChangeSet:
    """What changed since the watermarks. `now_ms` is the producer's clock: a run's `start_time` comes
    from the clock of whoever logged it, so the runs watermark never passes the producer's own clock,
    and runs are looked for down to `clock_skew_ms` before it (a run logged by a client whose clock is
    behind by up to that much is still found)."""
    out = ChangeSet()
    now = int(time.time() * 1000) if now_ms is None else now_ms

    def since(mark: int | None) -> int | None:
        return None if mark is None else _since(mark, overlap_ms)

    # Experiments: all of them (few; their ids are needed for the run searches); fingerprints say
    # which changed, timestamp or not.
    experiments = [e for page in reader.experiments() for e in page]
    names = {str(e.experiment_id): e.name for e in experiments}
    changed_experiments = []
    for e in experiments:
        state = experiment_state(e)
        if known.changed("EXPERIMENT", state):
            changed_experiments.append(str(e.experiment_id))
            out.entities.append(("EXPERIMENT", state))

    # Registry: models and versions newest first down to the watermark; of those, the ones whose
    # content differs from what was published changed. A changed model's versions are all re-read
    # (they carry its aliases) and the ones gone from it were deleted.
    models = _newest_first(reader.registered_models(order_by=["last_updated_timestamp DESC"],
                                                    first_page=_first_page(marks.registered_models)),
                           since(marks.registered_models), "last_updated_timestamp")
    listed_versions = _newest_first(reader.model_versions(order_by=["last_updated_timestamp DESC"],
                                                          first_page=_first_page(marks.model_versions)),
                                    since(marks.model_versions), "last_updated_timestamp")
    model_states = {m.name: registered_model_state(m) for m in models}
    changed_models = [n for n, st in model_states.items()
                      if known.changed("REGISTERED_MODEL", with_features(st, known.model_signatures(n).items()))]
    versions: dict[tuple[str, str], MlflowModelVersion] = {
        (v.name, str(v.version)): v for v in listed_versions
        if known.version_own.get(model_version_key(v.name, str(v.version)))
        != version_own_fingerprint(model_version_state(v, [], None))
    }
    if changed_models:
        listed: dict[str, set[str]] = {n: set() for n in changed_models}
        for page in reader.model_versions_of(changed_models):
            for v in page:
                versions[(v.name, str(v.version))] = v
                listed[v.name].add(str(v.version))
        for name, present in listed.items():
            for gone in sorted(known.versions_by_model.get(name, set()) - present):
                out.deleted_keys.append(model_version_key(name, gone))
    for name in changed_models:
        out.entities.append(("REGISTERED_MODEL", model_states[name]))

    # Runs: new ones, those still active, those of changed experiments (they carry its name).
    runs: dict[str, MlflowRun] = {}
    ids = list(names)
    runs_since = None if marks.runs is None else min(marks.runs, now) - overlap_ms - clock_skew_ms
    for page in reader.runs(ids, filter_string=f"attributes.start_time >= {runs_since}"
                            if runs_since is not None else ""):
        runs.update((r.info.run_id, r) for r in page)
    if changed_experiments and marks.experiments is not None:
        for page in reader.runs(changed_experiments):
            runs.update((r.info.run_id, r) for r in page)
    assemble(reader, known, names, model_states, versions, runs, out, extra_runs=known.active_runs,
             signatures=signatures)

    # MLflow 3 LoggedModels, newest first down to the watermark.
    logged = _newest_first(reader.logged_models(ids, newest_first=True, first_page=_first_page(marks.logged_models)),
                           since(marks.logged_models), "last_updated_timestamp")
    for model in logged:
        state = logged_model_state(model)
        if known.changed("LOGGED_MODEL", state):
            out.entities.append(("LOGGED_MODEL", state))

    out.watermarks = Watermarks(
        experiments=_max(e.last_update_time for e in experiments),
        registered_models=_max(m.last_updated_timestamp for m in models),
        model_versions=_max(v.last_updated_timestamp for v in listed_versions),
        runs=_max(min(r.info.start_time, now) if r.info.start_time else None for r in runs.values()),
        logged_models=_max(m.last_updated_timestamp for m in logged),
    )
    return out


def assemble(reader: MlflowReader, known: Known, names: dict[str, str], model_states: dict[str, RegisteredModel],
              versions: dict[tuple[str, str], MlflowModelVersion], runs: dict[str, MlflowRun], out: ChangeSet,
              extra_runs: Iterable[str] = (), changed: Callable[[EntityKind, Entity], bool] | None = None,
              signatures: Signatures | None = None) -> None:
    """Join runs and versions into self-contained states: fetch the runs that versions come from
    (and `extra_runs`, and the runs of versions deleted in `out`), the versions that runs produced,
    and append every state to `out`. A run's state is appended when `changed` says so (by default,
    when it differs from what `known` holds); versions always are, with their signatures (read by
    `signatures` when never read before; without it, as `known` holds them), and so are the models of
    `model_states` and of the versions, with the features of their live versions' signatures."""
    changed = changed or known.changed
    ids = list(names)
    deleted = {model_version_of_key(k) for k in out.deleted_keys if k.startswith("model_version:")}
    wanted = (set(extra_runs) | {v.run_id for v in versions.values() if v.run_id}
              | {known.run_of_version[d] for d in deleted if d in known.run_of_version}) - set(runs)
    if wanted:
        runs.update((r.info.run_id, r) for r in reader.runs_by_id(ids, sorted(wanted)))
    refs = {run_id: [r for r in known.refs_of_run(run_id) if (r["name"], r["version"]) not in deleted]
            for run_id in runs}
    for (name, version), v in versions.items():
        if v.run_id in refs and {"name": name, "version": version} not in refs[v.run_id]:
            refs[v.run_id].append({"name": name, "version": version})
    summaries: dict[str, RunSummary] = {}
    changed_runs = []
    for run_id, run in runs.items():
        state = run_state(run, names.get(str(run.info.experiment_id), ""), refs[run_id])
        summaries[run_id] = run_summary(state)
        if changed("RUN", state):
            changed_runs.append(run_id)
            out.entities.append(("RUN", state))
    # The versions a changed run produced carry its params and metrics: re-read them too.
    from_runs = [r for r in changed_runs if known.versions_by_run.get(r)]
    if from_runs:
        for page in reader.model_versions_of_runs(from_runs):
            versions.update(((v.name, str(v.version)), v) for v in page)
    missing = {n for n, _ in versions} - set(model_states)
    if missing:
        for page in reader.registered_models_named(missing):
            for m in page:
                model_states[m.name] = registered_model_state(m)
    aliases = {name: aliases_by_version(state) for name, state in model_states.items()}
    if signatures is not None:
        signatures.prefetch(versions.values())
    read: dict[tuple[str, str], SignatureRead] = {}
    for (name, version), v in sorted(versions.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        run = summaries.get(v.run_id) if v.run_id else None
        read[(name, version)] = signatures.of(v) if signatures is not None else known.signature_of(name, version)
        out.entities.append(("MODEL_VERSION", model_version_state(v, aliases.get(name, {}).get(version, []), run,
                                                                  read[(name, version)])))
    # A model carries the features of its live versions' signatures: what `known` holds, with what was
    # read here (the producer publishes the model only if that changed it).
    with_them: dict[str, RegisteredModel] = {}
    for name, state in model_states.items():
        live = {v: s for v, s in known.model_signatures(name).items() if (name, v) not in deleted}
        live.update({v: r["signature"] for (n, v), r in read.items() if n == name})
        with_them[name] = with_features(state, live.items())
    listed = {entity["name"]: i for i, (kind, entity) in enumerate(out.entities)  # type: ignore[typeddict-item]
              if kind == "REGISTERED_MODEL"}
    for name, state in with_them.items():
        if name in listed:
            out.entities[listed[name]] = ("REGISTERED_MODEL", state)
        else:
            out.entities.append(("REGISTERED_MODEL", state))


def read_model(reader: MlflowReader, known: Known, names: dict[str, str], model_name: str,
               signatures: Signatures | None = None) -> ChangeSet:
    """A targeted read of one registered model, its versions and the runs they came from (a webhook
    says something changed there). A model or version that is gone yields its DELETE."""
    return read_models(reader, known, names, [model_name], signatures)


def read_models(reader: MlflowReader, known: Known, names: dict[str, str], model_names: Iterable[str],
                signatures: Signatures | None = None) -> ChangeSet:
    """A targeted read of registered models, their versions and the runs those came from, a few
    requests for all of them (and, with `signatures`, one artifact request per version never read).
    A model or version that is gone yields its DELETE."""
    wanted = sorted(set(model_names))
    out = ChangeSet()
    model_states = {m.name: registered_model_state(m)
                    for page in reader.registered_models_named(wanted) for m in page}
    versions = {(v.name, str(v.version)): v for page in reader.model_versions_of(wanted) for v in page}
    for model_name in wanted:
        present = {version for name, version in versions if name == model_name}
        for gone in sorted(known.versions_by_model.get(model_name, set()) - present):
            out.deleted_keys.append(model_version_key(model_name, gone))
        if model_name not in model_states:
            out.deleted_keys.append(registered_model_key(model_name))
    for state in model_states.values():
        out.entities.append(("REGISTERED_MODEL", state))
    assemble(reader, known, names, model_states, versions, {}, out, signatures=signatures)
    return out
