"""MLflow objects -> entity states (the `after` of change events). Pure: data in, data out, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import yaml
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
    Signature,
    SignatureColumn,
    SignatureStatus,
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
    return {"run_id": run["run_id"], "params": run["params"], "metrics": run["metrics"],
            "dataset_inputs": run["dataset_inputs"]}


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
        "features": [],  # the signatures' inputs of its versions: `with_features`
    }


class SignatureRead(TypedDict):
    """What reading a model version's signature found (the `signature*` fields of its state)."""

    signature_status: SignatureStatus | None
    signature_reason: str | None
    signature: Signature | None


NOT_READ: SignatureRead = {"signature_status": None, "signature_reason": None, "signature": None}


def signature_read(status: SignatureStatus, reason: str | None = None,
                   signature: Signature | None = None) -> SignatureRead:
    return {"signature_status": status, "signature_reason": reason, "signature": signature}


def _column(spec: Any) -> SignatureColumn:
    """A ColSpec or TensorSpec of mlflow.types.schema as the contract carries it."""
    from mlflow.types.schema import DataType, TensorSpec

    if isinstance(spec, TensorSpec):
        return {"name": spec.name, "type": str(spec.type), "kind": "tensor", "optional": not spec.required,
                "shape": [int(d) for d in spec.shape]}
    kind = spec.type.name if isinstance(spec.type, DataType) else str(spec.type)
    return {"name": spec.name, "type": kind, "kind": "column", "optional": not spec.required,
            "shape": None}


def _schema(text: Any) -> list[SignatureColumn]:
    from mlflow.types.schema import Schema

    specs = json.loads(text) if isinstance(text, str) else text
    if not specs:
        return []
    return [_column(spec) for spec in Schema.from_json(json.dumps(specs)).inputs]


def parse_mlmodel(text: str) -> SignatureRead:
    """The signature of an `MLmodel` file (YAML, as MLflow writes it), parsed with MLflow's own
    `mlflow.types.Schema`. Pure; a file that is no MLmodel, or a signature MLflow cannot read, is
    UNREADABLE (never an exception)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return signature_read("UNREADABLE", f"its MLmodel file is not YAML ({str(e).splitlines()[0][:120]})")
    if not isinstance(document, dict):
        return signature_read("UNREADABLE", "its MLmodel file is not an MLmodel (no YAML mapping)")
    signature = document.get("signature")
    if not isinstance(signature, dict) or not (signature.get("inputs") or signature.get("outputs")):
        return signature_read("ABSENT", "its model was logged without a signature")
    try:
        parsed: Signature = {"inputs": _schema(signature.get("inputs")), "outputs": _schema(signature.get("outputs"))}
    except Exception as e:  # MLflow's parser of a schema written by another MLflow: any error means unreadable
        return signature_read("UNREADABLE", f"its signature cannot be read ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:120] if str(e) else ''})")
    return signature_read("PRESENT", None, parsed)


def with_features(model: RegisteredModel, signatures: Iterable[tuple[str, Signature | None]]) -> RegisteredModel:
    """The model's state with `features`: the named inputs of its versions' signatures (`(version,
    signature)` of every live version), one per name, as the highest version that has it gives it,
    in name order. Pure."""
    features: dict[str, SignatureColumn] = {}
    for _, signature in sorted(signatures, key=lambda vs: int(vs[0]) if vs[0].isdigit() else 0):
        for column in (signature or {}).get("inputs", []):  # type: ignore[union-attr]
            if column["name"]:
                features[column["name"]] = column
    return {**model, "features": [features[name] for name in sorted(features)]}


def model_version_state(
    version: MlflowModelVersion, aliases: Iterable[str], run: RunSummary | None,
    signature: SignatureRead = NOT_READ,
) -> ModelVersion:
    """A model version's state. MLflow's version search leaves `aliases` empty, so the caller passes
    the aliases from the registered model; `run` is the producing run's summary, if it exists;
    `signature` what reading its logged model's signature found (connector/mlflow/signatures.py)."""
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
        **signature,
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
