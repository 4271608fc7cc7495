"""Demo MLflow content: the fixture used by the demo, the integration tests and the parity test.

It covers every shape the mapping has to handle: the default experiment, an empty and a deleted
experiment, finished/failed/running runs with params, metrics, tags and a dataset input, a model
with versions in every stage, an alias, a version without a run, a model without versions, and
names with spaces and slashes.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

log = logging.getLogger("connector.demo")

MARKER_EXPERIMENT = "demo/training runs"


@dataclass
class DemoContent:
    """What `populate` created, by name, for tests to refer to."""

    experiment_ids: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)


def _dataset() -> DatasetInput:
    schema = json.dumps({"mlflow_colspec": [
        {"type": "double", "name": "sepal length", "required": True},
        {"type": "long", "name": "label", "required": True},
    ]})
    dataset = Dataset(
        name="iris training set",
        digest="d1g35t",
        source_type="local",
        source='{"uri": "/data/iris.csv"}',
        schema=schema,
        profile='{"num_rows": 150}',
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value="training")])


def _log_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    status: str | None,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str],
    with_dataset: bool = False,
) -> str:
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 1_700_000_000_000, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    if with_dataset:
        client.log_inputs(run_id, datasets=[_dataset()])
    if status is not None:
        client.set_terminated(run_id, status=status)
    return run_id


def populate(tracking_uri: str) -> DemoContent:
    """Create the demo content on the MLflow server at `tracking_uri`; idempotent."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    warnings.filterwarnings("ignore", category=FutureWarning, module="connector.devstack.demo")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    content = DemoContent()
    existing = client.get_experiment_by_name(MARKER_EXPERIMENT)
    if existing is not None:
        log.info("demo content already present on %s", tracking_uri)
        return _describe(client)

    training = client.create_experiment(
        MARKER_EXPERIMENT, tags={"team": "search", "mlflow.note.content": "Training runs for the demo"}
    )
    client.create_experiment("empty experiment")
    deleted = client.create_experiment("retired experiment")
    client.log_param(client.create_run(deleted).info.run_id, "alpha", "0.1")
    client.delete_experiment(deleted)

    finished = _log_run(
        client, training, "finished run", "FINISHED",
        {"learning_rate": "0.01", "epochs": "10"}, {"accuracy": 0.93, "loss": 0.21},
        {"owner": "alice", "purpose": "baseline"}, with_dataset=True,
    )
    failed = _log_run(
        client, training, "failed run", "FAILED", {"learning_rate": "1.5"}, {"loss": 9.9}, {"owner": "bob"}
    )
    running = _log_run(
        client, training, "running run", None, {"learning_rate": "0.02"}, {"accuracy": 0.5}, {"owner": "carol"}
    )
    default_run = _log_run(client, "0", "default experiment run", "FINISHED", {"depth": "3"}, {"rmse": 1.25}, {})

    model = "demo classifier"
    client.create_registered_model(model, tags={"domain": "demo"}, description="Classifies demo data")
    versions = []
    for stage, run_id in (("Production", finished), ("Staging", failed), ("Archived", running), ("None", finished)):
        mv = client.create_model_version(
            model, source=f"runs:/{run_id}/model", run_id=run_id, tags={"stage_hint": stage.lower()},
            description=f"version for {stage}",
        )
        if stage != "None":
            client.transition_model_version_stage(model, mv.version, stage)
        versions.append(mv.version)
    no_run = client.create_model_version(
        model, source="s3://demo-bucket/models/handmade", run_id=None, description="no run"
    )
    versions.append(no_run.version)
    client.set_registered_model_alias(model, "champion", versions[0])
    client.create_registered_model("model without versions", description="nothing registered yet")

    content.experiment_ids = {MARKER_EXPERIMENT: training, "Default": "0"}
    content.run_ids = {"finished": finished, "failed": failed, "running": running, "default": default_run}
    content.models = {model: versions, "model without versions": []}
    log.info("demo content created on %s", tracking_uri)
    return content


def _describe(client: MlflowClient) -> DemoContent:
    content = DemoContent()
    training = client.get_experiment_by_name(MARKER_EXPERIMENT)
    assert training is not None
    content.experiment_ids = {MARKER_EXPERIMENT: training.experiment_id, "Default": "0"}
    for run in client.search_runs([training.experiment_id, "0"]):
        content.run_ids[run.info.run_name.split()[0]] = run.info.run_id
    for model in client.search_registered_models():
        content.models[model.name] = [mv.version for mv in client.search_model_versions(f"name = '{model.name}'")]
    return content


# -- the guided demo behind `make demo` ----------------------------------------------------------


def live_change(tracking_uri: str) -> str:
    """A change to make while the connector streams: a retrained run, registered as a new version of
    the demo model. Returns the new run's id."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    training = client.get_experiment_by_name(MARKER_EXPERIMENT)
    assert training is not None
    run_id = _log_run(client, training.experiment_id, "retrained run", "FINISHED",
                      {"learning_rate": "0.005", "epochs": "20"}, {"accuracy": 0.96, "loss": 0.12}, {"owner": "alice"})
    client.create_model_version("demo classifier", source=f"runs:/{run_id}/model", run_id=run_id,
                                description="retrained")
    return run_id


def registry_listing(tracking_uri: str) -> str:
    """The registry as this process's MLflow client lists it, as JSON: {model name: [version, ...]}
    (run by another MLflow version's Python, to compare with what the connector reads)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    listing: dict[str, list[str]] = {m.name: [] for m in client.search_registered_models(max_results=1000)}
    for version in client.search_model_versions(max_results=10000):
        listing.setdefault(version.name, []).append(str(version.version))
    return json.dumps({name: sorted(versions, key=int) for name, versions in sorted(listing.items())})
