"""Confirming that an entity is gone before anything says so.

MLflow's page tokens are offsets: an object deleted while a listing runs shifts every later page
by one, and the object at the page boundary is never listed although it is alive. A complete
listing's "not seen" is therefore only a candidate for deletion; each candidate is read again by
itself (by id or name), and only what MLflow then answers "does not exist" for is gone. What MLflow
still has comes back as its current state, to be published again within the snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException

from connector.contract.events import Entity, EntityKind, entity_key, kind_of_key, model_version_of_key
from connector.mlflow.entities import experiment_state, logged_model_state
from connector.mlflow.incremental import ChangeSet, Known, assemble, read_model
from connector.mlflow.reader import MlflowReader, does_not_exist

log = logging.getLogger("connector.listing")


@dataclass
class Confirmation:
    gone: list[str] = field(default_factory=list)  # keys MLflow confirms it no longer has
    alive: list[tuple[EntityKind, Entity]] = field(default_factory=list)  # current states of the others


def _or_none(reader: MlflowReader, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """One targeted read; None when MLflow answers that the object does not exist (its own 404 with
    RESOURCE_DOES_NOT_EXIST: a proxy's 404 page says nothing about the object, and is raised)."""
    try:
        return reader.call(what, fn, *args)
    except MlflowException as e:
        if does_not_exist(e):
            return None
        raise


def confirm_gone(reader: MlflowReader, known: Known, experiment_names: dict[str, str],
                 keys: Iterable[str]) -> Confirmation:
    """Read each candidate again by itself. Raises MlflowUnavailable when MLflow does not answer:
    nothing is then confirmed, and nothing may be deleted."""
    out = Confirmation()
    candidates = sorted(set(keys))
    by_kind: dict[str, list[str]] = {}
    for key in candidates:
        by_kind.setdefault(kind_of_key(key), []).append(key)

    by_id: list[tuple[EntityKind, str, Callable[..., Any], Callable[[Any], Entity]]] = [
        ("EXPERIMENT", "get_experiment", reader.tracking.get_experiment, experiment_state),
        ("LOGGED_MODEL", "get_logged_model", reader.tracking.get_logged_model, logged_model_state),
    ]
    for kind, what, get, state_of in by_id:
        for key in by_kind.get(kind, []):
            found = _or_none(reader, what, get, key.split(":", 1)[1])
            if found is None:
                out.gone.append(key)
            else:
                out.alive.append((kind, state_of(found)))

    registry = by_kind.get("REGISTERED_MODEL", []) + by_kind.get("MODEL_VERSION", [])
    names = sorted({key.split(":", 1)[1] if key.startswith("registered_model:") else model_version_of_key(key)[0]
                    for key in registry})
    for name in names:
        changes = read_model(reader, known, experiment_names, name)
        out.gone += [key for key in registry if key in changes.deleted_keys]
        out.alive += changes.entities

    run_keys = by_kind.get("RUN", [])
    if run_keys:
        wanted = [key.split(":", 1)[1] for key in run_keys]
        found = {r.info.run_id: r for r in reader.runs_by_id(list(experiment_names), wanted)}
        out.gone += [key for key, run_id in zip(run_keys, wanted, strict=True) if run_id not in found]
        if found:
            changes = ChangeSet()
            # Every state, changed or not: `Known` must not filter what the snapshot has to see.
            assemble(reader, known, experiment_names, {}, {}, found, changes, changed=lambda kind, entity: True)
            out.alive += changes.entities
    # Only the candidates themselves: the other states these reads joined (a model's runs, a run's
    # versions) were listed by the snapshot already, and joined here with what `Known` held before it.
    wanted = set(candidates)
    out.alive = [(kind, entity) for kind, entity in out.alive if entity_key(kind, entity) in wanted]
    return out

