"""What MLflow holds, as entity states, read in bulk and joined into self-contained events.

A complete listing reads experiments, registered models and model versions (small), then streams
runs page by page across many experiments at once. Each run is joined with the versions it
produced and each version with its run, so no per-object call is made. Memory holds the
experiments' names and the model versions' index, never the runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion

from connector.contract.events import Entity, EntityKind, ModelVersionRef, RegisteredModel, RunSummary, Signature
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
from connector.mlflow.reader import MlflowReader, MlflowUnavailable
from connector.redaction import without_credentials

if TYPE_CHECKING:
    from connector.mlflow.entities import SignatureRead
    from connector.mlflow.signatures import Signatures

log = logging.getLogger("connector.listing")

FIRST_RUNS_PAGE = 200


@dataclass
class RegistryIndex:
    """Registered models and their versions, indexed for the joins."""

    models: dict[str, RegisteredModel] = field(default_factory=dict)
    versions: list[MlflowModelVersion] = field(default_factory=list)
    by_run: dict[str, list[MlflowModelVersion]] = field(default_factory=dict)

    def refs_of_run(self, run_id: str) -> list[ModelVersionRef]:
        return [{"name": v.name, "version": str(v.version)} for v in self.by_run.get(run_id, [])]

    def aliases(self, version: MlflowModelVersion) -> list[str]:
        model = self.models.get(version.name)
        return aliases_by_version(model).get(str(version.version), []) if model else []


class UntrustedListing(MlflowUnavailable):
    """MLflow's answers contradict each other: the listing is not taken as complete, nothing is deleted."""


# A contradiction can be a race (a version registered between the search of models and the search of
# versions); a server that filters one search and not the other answers the same way every time.
REGISTRY_READ_ATTEMPTS = 3


def registry_contradictions(index: RegistryIndex) -> str | None:
    """Why the registry's two searches cannot both be complete, or None. Pure.

    Versions of registered models that the model search did not return, or registered models whose
    latest versions the version search did not return: an MLflow server that filtered one search and
    not the other (as an MLflow 2.x server does with the MLflow 3 client's prompt filter)."""
    listed_versions = {(v.name, str(v.version)) for v in index.versions}
    orphans = sorted({v.name for v in index.versions if v.name not in index.models})
    missing = sorted(f"{name} version {latest['version']}" for name, model in index.models.items()
                     for latest in model["latest_versions"] if (name, latest["version"]) not in listed_versions)
    reasons = []
    if orphans:
        reasons.append(f"model versions of {len(orphans)} registered models that the search of registered models "
                       f"did not return (e.g. {orphans[0]!r})")
    if missing:
        reasons.append(f"{len(missing)} latest versions of registered models that the search of model versions "
                       f"did not return (e.g. {missing[0]!r})")
    return "; ".join(reasons) or None


def read_registry(reader: MlflowReader) -> RegistryIndex:
    """Registered models and versions, read until the two searches agree (a change between them is
    read again); raises UntrustedListing when they keep contradicting each other."""
    contradiction = None
    for attempt in range(REGISTRY_READ_ATTEMPTS):
        index = _read_registry_once(reader)
        contradiction = registry_contradictions(index)
        if contradiction is None:
            return index
        log.info("registry read %d of %d contradicts itself (%s); reading it again", attempt + 1,
                 REGISTRY_READ_ATTEMPTS, contradiction)
    raise UntrustedListing(f"MLflow at {without_credentials(reader.settings.registry_uri)} answered inconsistently "
                           f"{REGISTRY_READ_ATTEMPTS} times: {contradiction}; the listing is not complete")


def _read_registry_once(reader: MlflowReader) -> RegistryIndex:
    index = RegistryIndex()
    for page in reader.registered_models():
        for model in page:
            index.models[model.name] = registered_model_state(model)
    for versions in reader.model_versions():
        for version in versions:
            index.versions.append(version)
            if version.run_id:
                index.by_run.setdefault(version.run_id, []).append(version)
    return index


class Totals(Protocol):
    """Told how many objects of a kind MLflow has, once the listing knows (progress displays)."""

    def total(self, kind: str, count: int) -> None: ...


def full_listing(reader: MlflowReader, totals: Totals | None = None,
                 signatures: Signatures | None = None) -> Iterator[tuple[EntityKind, Entity]]:
    """Every entity of MLflow, in dependency order. Raises MlflowUnavailable if a read fails:
    a listing that did not run to its end is never mistaken for a complete one. With `signatures`,
    versions carry what was read of their signatures before and models the features of those (the
    listing reads no artifact: versions met unread are read after it, see connector/mlflow/signatures.py);
    without, neither does."""
    experiments = [e for page in reader.experiments() for e in page]
    if totals is not None:
        totals.total("EXPERIMENT", len(experiments))
    experiment_names: dict[str, str] = {}
    for experiment in experiments:
        experiment_names[str(experiment.experiment_id)] = experiment.name
        yield "EXPERIMENT", experiment_state(experiment)
    index = read_registry(reader)
    if totals is not None:
        totals.total("REGISTERED_MODEL", len(index.models))
        totals.total("MODEL_VERSION", len(index.versions))
    def read_before(version: MlflowModelVersion) -> SignatureRead:
        return signatures.known(version) if signatures is not None else NOT_READ

    by_model: dict[str, list[tuple[str, Signature | None]]] = {}
    for v in index.versions:
        by_model.setdefault(v.name, []).append((str(v.version), read_before(v)["signature"]))
    for model in index.models.values():
        yield "REGISTERED_MODEL", with_features(model, by_model.get(model["name"], []))
    emitted_versions: set[tuple[str, str]] = set()
    # The first page small, so that the first events are on their way (and the consumer at work)
    # while MLflow still searches; each next page requested while this one is worked on.
    for page in reader.runs(list(experiment_names), first_page=FIRST_RUNS_PAGE, prefetch=True):
        for run in page:
            state = run_state(run, experiment_names.get(str(run.info.experiment_id), ""),
                              index.refs_of_run(run.info.run_id))
            yield "RUN", state
            for version in index.by_run.get(run.info.run_id, []):
                emitted_versions.add((version.name, str(version.version)))
                yield "MODEL_VERSION", model_version_state(version, index.aliases(version), run_summary(state),
                                                           read_before(version))
    # Versions whose run was not among the listed runs: without a run, or with a run elsewhere.
    orphans = [v for v in index.versions if (v.name, str(v.version)) not in emitted_versions]
    summaries: dict[str, RunSummary] = {}
    wanted = [v.run_id for v in orphans if v.run_id]
    if wanted:
        for run in reader.runs_by_id(list(experiment_names), wanted):
            summaries[run.info.run_id] = run_summary(run_state(run, "", []))
    for version in orphans:
        run = summaries.get(version.run_id) if version.run_id else None
        yield "MODEL_VERSION", model_version_state(version, index.aliases(version), run, read_before(version))
    for page in reader.logged_models(list(experiment_names)):
        for model in page:
            yield "LOGGED_MODEL", logged_model_state(model)
