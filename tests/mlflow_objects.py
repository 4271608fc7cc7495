"""In-memory MLflow entities and change events for the unit tests (no server, no I/O).

MLflow's entity classes are plain data objects; these builders fill them with the values of the
demo MLflow that produced DataHub's reference output, so tests only spell out what they vary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from mlflow.entities import (
    Dataset,
    DatasetInput,
    Experiment,
    ExperimentTag,
    InputTag,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunInputs,
    RunTag,
)
from mlflow.entities.model_registry import (
    ModelVersion,
    ModelVersionTag,
    RegisteredModel,
    RegisteredModelAlias,
    RegisteredModelTag,
)

from connector.contract import envelope
from connector.contract.events import ChangeEvent, Entity, EntityKind, Operation, Source
from connector.mlflow import entities as changes

TRACKING_URI = "http://mlflow.example:5000"
READ_AT_MS = 1_795_793_706_000
COLSPEC_SCHEMA = json.dumps(
    {"mlflow_colspec": [{"name": "sepal length", "type": "double"}, {"name": "label", "type": "long"}]}
)


def experiment(
    experiment_id: str = "1",
    name: str = "demo/training runs",
    *,
    tags: Mapping[str, str] | None = None,
    lifecycle_stage: str = "active",
    artifact_location: str = "/tmp/mlf/artifacts/1",
) -> Experiment:
    if tags is None:
        tags = {"mlflow.note.content": "Training runs for the demo", "team": "search"}
    return Experiment(
        experiment_id=experiment_id,
        name=name,
        artifact_location=artifact_location,
        lifecycle_stage=lifecycle_stage,
        tags=[ExperimentTag(k, v) for k, v in tags.items()],
        creation_time=1_795_793_700_000,
        last_update_time=1_795_793_700_100,
    )


def dataset_input(
    name: str = "iris training set",
    source_type: str = "local",
    *,
    schema: str | None = COLSPEC_SCHEMA,
    source: str = "file:///tmp/iris.csv",
    tags: Mapping[str, str] | None = None,
) -> DatasetInput:
    if tags is None:
        tags = {"mlflow.data.context": "training"}
    dataset = Dataset(name=name, digest="d1g35t", source_type=source_type, source=source, schema=schema)
    return DatasetInput(dataset, [InputTag(k, v) for k, v in tags.items()])


def run(
    run_id: str = "0d03f13b7d7e45b59784c93c1b108efd",
    *,
    experiment_id: str = "1",
    run_name: str = "finished run",
    status: str = "FINISHED",
    start_time: int | None = 1_795_793_700_532,
    end_time: int | None = 1_795_793_700_665,
    lifecycle_stage: str = "active",
    user_id: str = "alice",
    artifact_uri: str = "/tmp/mlf/artifacts/1/0d03f13b7d7e45b59784c93c1b108efd/artifacts",
    params: Mapping[str, str] | None = None,
    metrics: Iterable[Metric] | None = None,
    tags: Mapping[str, str] | None = None,
    datasets: Iterable[DatasetInput] = (),
) -> Run:
    if params is None:
        params = {"learning_rate": "0.01", "epochs": "10"}
    if metrics is None:
        metrics = [Metric("accuracy", 0.93, 1_795_793_700_600, 3), Metric("loss", 0.21, 1_795_793_700_601, 3)]
    if tags is None:
        tags = {"mlflow.user": user_id, "team": "search"}
    info = RunInfo(
        run_id=run_id,
        experiment_id=experiment_id,
        user_id=user_id,
        status=status,
        start_time=start_time,  # type: ignore[arg-type]
        end_time=end_time,
        lifecycle_stage=lifecycle_stage,
        artifact_uri=artifact_uri,
        run_name=run_name,
    )
    data = RunData(
        metrics=list(metrics),
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return Run(info, data, RunInputs(dataset_inputs=list(datasets)))


def registered_model(
    name: str = "demo classifier",
    *,
    latest: Iterable[tuple[str, str]] = (
        ("3", "Archived"),
        ("4", "None"),
        ("1", "Production"),
        ("2", "Staging"),
    ),
    aliases: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    description: str | None = "Classifies demo data",
) -> RegisteredModel:
    """`latest` are MLflow's (version, stage) "latest versions", in MLflow's order."""
    return RegisteredModel(
        name=name,
        creation_timestamp=1_795_793_701_129,
        last_updated_timestamp=1_795_793_701_606,
        description=description,
        latest_versions=[
            ModelVersion(name, version, 1_795_793_701_200, current_stage=stage) for version, stage in latest
        ],
        tags=[
            RegisteredModelTag(k, v) for k, v in (tags if tags is not None else {"domain": "demo"}).items()
        ],
        aliases=[RegisteredModelAlias(a, v) for a, v in (aliases or {}).items()],
    )


def model_version(
    name: str = "demo classifier",
    version: str = "1",
    *,
    stage: str | None = "Production",
    run_id: str | None = "0d03f13b7d7e45b59784c93c1b108efd",
    user_id: str | None = "alice",
    description: str | None = "version for Production",
    tags: Mapping[str, str] | None = None,
    aliases: Iterable[str] = (),
) -> ModelVersion:
    return ModelVersion(
        name=name,
        version=version,
        creation_timestamp=1_795_793_701_207,
        last_updated_timestamp=1_795_793_701_351,
        description=description,
        user_id=user_id,
        current_stage=stage,
        source=f"models:/{name}/{version}",
        run_id=run_id,
        tags=[
            ModelVersionTag(k, v)
            for k, v in (tags if tags is not None else {"stage_hint": "production"}).items()
        ],
        aliases=list(aliases),
    )


# ---- change events ----------------------------------------------------------------------------


def source(tracking_uri: str = TRACKING_URI, snapshot_id: str | None = None) -> Source:
    return envelope.source_block(tracking_uri, tracking_uri, READ_AT_MS, snapshot_id)


def changed(
    kind: EntityKind, state: Entity, *, op: Operation = "UPDATE", tracking_uri: str = TRACKING_URI
) -> ChangeEvent:
    return envelope.entity_changed(op, kind, state, source(tracking_uri), READ_AT_MS + 1)


def run_event(
    mlflow_run: Run,
    experiment_name: str = "demo/training runs",
    versions: Iterable[tuple[str, str]] = (),
    *,
    tracking_uri: str = TRACKING_URI,
) -> ChangeEvent:
    refs = [{"name": n, "version": v} for n, v in versions]
    state = changes.run_state(mlflow_run, experiment_name, refs)  # type: ignore[arg-type]
    return changed("RUN", state, tracking_uri=tracking_uri)


def model_version_event(
    version: ModelVersion,
    model: RegisteredModel | None = None,
    mlflow_run: Run | None = None,
    *,
    tracking_uri: str = TRACKING_URI,
) -> ChangeEvent:
    """A model version's event as the reader builds it: aliases from the registered model, the run's
    params and metrics from the run."""
    aliases = (
        changes.aliases_by_version(changes.registered_model_state(model)).get(version.version, [])
        if model is not None
        else []
    )
    summary = (
        changes.run_summary(changes.run_state(mlflow_run, "unused", [])) if mlflow_run is not None else None
    )
    return changed(
        "MODEL_VERSION", changes.model_version_state(version, aliases, summary), tracking_uri=tracking_uri
    )
