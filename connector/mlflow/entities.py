"""MLflow objects -> entity states (the `after` of change events). Pure: data in, data out, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlflow.entities import Experiment as MlflowExperiment
from mlflow.entities import LoggedModel as MlflowLoggedModel
from mlflow.entities import Run as MlflowRun
from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
from mlflow.entities.model_registry import RegisteredModel as MlflowRegisteredModel

from connector.contract.events import (
    DatasetInput,
    Experiment,
    LoggedModel,
    Metric,
    ModelVersion,
    ModelVersionRef,
    RegisteredModel,
    Run,
    RunSummary,
    Tag,
)


def _tags(items: Mapping[str, Any] | None) -> list[Tag]:
    return [{"key": str(k), "value": str(v)} for k, v in (items or {}).items()]


def _none_if_empty(value: Any) -> Any:
    return value if value not in ("", None) else None


def experiment_state(experiment: MlflowExperiment) -> Experiment:
    return {
        "experiment_id": str(experiment.experiment_id),
        "name": experiment.name,
        "artifact_location": experiment.artifact_location,
        "lifecycle_stage": experiment.lifecycle_stage,
        "tags": _tags(experiment.tags),
        "creation_time": experiment.creation_time,
        "last_update_time": experiment.last_update_time,
    }


def _metrics(run: MlflowRun) -> list[Metric]:
    """Latest value of each metric, in MLflow's order (the same order `run.data.metrics` has)."""
    latest = {m.key: m for m in run.data._metric_objs} if hasattr(run.data, "_metric_objs") else {}
    return [
        {
            "key": key,
            "value": float(value),
            "timestamp": int(getattr(latest.get(key), "timestamp", 0) or 0),
            "step": int(getattr(latest.get(key), "step", 0) or 0),
        }
        for key, value in run.data.metrics.items()
    ]


def _dataset_inputs(run: MlflowRun) -> list[DatasetInput]:
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return [
        {
            "name": d.dataset.name,
            "digest": d.dataset.digest,
            "source_type": d.dataset.source_type,
            "source": d.dataset.source,
            "schema": d.dataset.schema,
            "profile": d.dataset.profile,
            "tags": [{"key": t.key, "value": t.value} for t in d.tags],
        }
        for d in inputs
    ]


def run_state(run: MlflowRun, experiment_name: str, model_versions: Iterable[ModelVersionRef]) -> Run:
    """A run's state; `model_versions` are the versions registered from it, in version order."""
    info = run.info
    return {
        "run_id": info.run_id,
        "run_name": _none_if_empty(info.run_name),
        "experiment_id": str(info.experiment_id),
        "experiment_name": experiment_name,
        "status": info.status,
        "lifecycle_stage": info.lifecycle_stage,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "user_id": _none_if_empty(info.user_id),
        "artifact_uri": info.artifact_uri,
        "params": _tags(run.data.params),
        "metrics": _metrics(run),
        "tags": _tags(run.data.tags),
        "dataset_inputs": _dataset_inputs(run),
        "model_versions": sorted(model_versions, key=lambda v: (v["name"], int(v["version"]))),
    }


def run_summary(run: Run) -> RunSummary:
    """What a model version needs from the run that produced it."""
    return {"run_id": run["run_id"], "params": run["params"], "metrics": run["metrics"]}


def stage_of(version: MlflowModelVersion) -> str:
    """The version's stage as the contract carries it: MLflow's stage name ("None" when an MLflow
    registry says the version has no stage), or "" when the registry has no stages at all (a Unity
    Catalog registry answers `current_stage` None)."""
    return version.current_stage if version.current_stage is not None else ""


def registered_model_state(model: MlflowRegisteredModel) -> RegisteredModel:
    aliases = model.aliases or {}
    return {
        "name": model.name,
        "description": model.description,
        "creation_timestamp": model.creation_timestamp,
        "last_updated_timestamp": model.last_updated_timestamp,
        "tags": _tags(model.tags),
        "aliases": [{"alias": a, "version": str(v)} for a, v in sorted(aliases.items())],
        "latest_versions": [
            {"version": str(v.version), "stage": stage_of(v)} for v in (model.latest_versions or [])
        ],
    }


def model_version_state(
    version: MlflowModelVersion, aliases: Iterable[str], run: RunSummary | None
) -> ModelVersion:
    """A model version's state. MLflow's version search leaves `aliases` empty, so the caller passes
    the aliases from the registered model; `run` is the producing run's summary, if it exists."""
    return {
        "name": version.name,
        "version": str(version.version),
        "creation_timestamp": version.creation_timestamp,
        "last_updated_timestamp": version.last_updated_timestamp,
        "description": version.description,
        "user_id": _none_if_empty(version.user_id),
        "current_stage": stage_of(version),
        "source": _none_if_empty(version.source),
        "run_id": _none_if_empty(version.run_id),
        "status": _none_if_empty(version.status),
        "tags": _tags(version.tags),
        "aliases": sorted(set(aliases) | set(version.aliases or [])),
        "run": run,
    }


def logged_model_state(model: MlflowLoggedModel) -> LoggedModel:
    status = model.status
    return {
        "model_id": model.model_id,
        "experiment_id": str(model.experiment_id),
        "name": model.name,
        "artifact_location": model.artifact_location,
        "creation_timestamp": model.creation_timestamp,
        "last_updated_timestamp": model.last_updated_timestamp,
        "model_type": model.model_type,
        "source_run_id": _none_if_empty(model.source_run_id),
        "status": str(status.value if hasattr(status, "value") else status) if status is not None else None,
        "tags": _tags(model.tags),
        "params": _tags(model.params),
        "metrics": [
            {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp or 0), "step": int(m.step or 0)}
            for m in (model.metrics or [])
        ],
    }


def aliases_by_version(model: RegisteredModel) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias in model["aliases"]:
        by_version.setdefault(alias["version"], []).append(alias["alias"])
    return by_version
