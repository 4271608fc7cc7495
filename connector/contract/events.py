"""Change events: the records of the change topic, as the Avro schemas in `schemas/` define them.

Events are plain dicts shaped like the Avro records (what fastavro reads and writes); the
TypedDicts below give them names and types. An event is self-contained: it carries everything
that the MCPs of its entity need, so any consumer can transform any event alone.
"""

from __future__ import annotations

from typing import Literal, TypedDict

Operation = Literal["CREATE", "UPDATE", "DELETE", "READ", "SNAPSHOT_BEGIN", "SNAPSHOT_END"]
EntityKind = Literal["EXPERIMENT", "RUN", "REGISTERED_MODEL", "MODEL_VERSION", "SNAPSHOT", "LOGGED_MODEL"]

NAMESPACE = "io.github.mlflow_datahub"


class Tag(TypedDict):
    key: str
    value: str


class Metric(TypedDict):
    key: str
    value: float
    timestamp: int
    step: int


class Experiment(TypedDict):
    experiment_id: str
    name: str
    artifact_location: str | None
    lifecycle_stage: str
    tags: list[Tag]
    creation_time: int | None
    last_update_time: int | None


class DatasetInput(TypedDict):
    name: str
    digest: str
    source_type: str
    source: str
    schema: str | None
    profile: str | None
    tags: list[Tag]


class ModelVersionRef(TypedDict):
    name: str
    version: str


class Run(TypedDict):
    run_id: str
    run_name: str | None
    experiment_id: str
    experiment_name: str
    status: str
    lifecycle_stage: str
    start_time: int | None
    end_time: int | None
    user_id: str | None
    artifact_uri: str | None
    params: list[Tag]
    metrics: list[Metric]
    tags: list[Tag]
    dataset_inputs: list[DatasetInput]
    model_versions: list[ModelVersionRef]


class Alias(TypedDict):
    alias: str
    version: str


class StageVersion(TypedDict):
    version: str
    stage: str


class SignatureColumn(TypedDict):
    """One input or output of a model signature (schema version 3)."""

    name: str | None
    type: str  # MLflow's type of a column (double, long, Array(string), ...), a tensor's dtype
    kind: Literal["column", "tensor"]
    optional: bool
    shape: list[int] | None  # tensors only


class Signature(TypedDict):
    inputs: list[SignatureColumn]
    outputs: list[SignatureColumn]


SignatureStatus = Literal["PRESENT", "ABSENT", "UNREADABLE", "UNAVAILABLE"]


def signature_to_read(status: str | None) -> bool:
    """Whether a version's signature is still to be read: never read (None), or MLflow did not answer."""
    return status in (None, "UNAVAILABLE")


class RegisteredModel(TypedDict):
    name: str
    description: str | None
    creation_timestamp: int | None
    last_updated_timestamp: int | None
    tags: list[Tag]
    aliases: list[Alias]
    latest_versions: list[StageVersion]
    features: list[SignatureColumn]  # v3: named signature inputs of its versions, one per name


class RunSummary(TypedDict):
    run_id: str
    params: list[Tag]
    metrics: list[Metric]
    dataset_inputs: list[DatasetInput]  # v3


class ModelVersion(TypedDict):
    name: str
    version: str
    creation_timestamp: int | None
    last_updated_timestamp: int | None
    description: str | None
    user_id: str | None
    current_stage: str
    source: str | None
    run_id: str | None
    status: str | None
    tags: list[Tag]
    aliases: list[str]
    run: RunSummary | None
    signature_status: SignatureStatus | None  # v3; None: not read
    signature_reason: str | None  # v3: why UNREADABLE or UNAVAILABLE
    signature: Signature | None  # v3: when PRESENT


class LoggedModel(TypedDict):
    """An MLflow 3 LoggedModel (schema version 2)."""

    model_id: str
    experiment_id: str
    name: str
    artifact_location: str | None
    creation_timestamp: int | None
    last_updated_timestamp: int | None
    model_type: str | None
    source_run_id: str | None
    status: str | None
    tags: list[Tag]
    params: list[Tag]
    metrics: list[Metric]


class SnapshotMarker(TypedDict):
    snapshot_id: str
    partitions: int
    complete: bool
    entities: int


Entity = Experiment | Run | RegisteredModel | ModelVersion | LoggedModel


class Source(TypedDict):
    connector: str
    version: str
    tracking_uri: str
    registry_uri: str
    read_at_ms: int
    snapshot_id: str | None


class ChangeEvent(TypedDict):
    op: Operation
    kind: EntityKind
    key: str
    after: Entity | SnapshotMarker | None
    source: Source
    ts_ms: int


# Avro record name of the `after` branch, per kind (fastavro needs it to pick the union branch).
RECORD_NAMES: dict[EntityKind, str] = {
    "EXPERIMENT": f"{NAMESPACE}.Experiment",
    "RUN": f"{NAMESPACE}.Run",
    "REGISTERED_MODEL": f"{NAMESPACE}.RegisteredModel",
    "MODEL_VERSION": f"{NAMESPACE}.ModelVersion",
    "SNAPSHOT": f"{NAMESPACE}.SnapshotMarker",
    "LOGGED_MODEL": f"{NAMESPACE}.LoggedModel",
}


def experiment_key(experiment_id: str) -> str:
    return f"experiment:{experiment_id}"


def run_key(run_id: str) -> str:
    return f"run:{run_id}"


def registered_model_key(name: str) -> str:
    return f"registered_model:{name}"


def model_version_key(name: str, version: str) -> str:
    return f"model_version:{name}/{version}"


def logged_model_key(model_id: str) -> str:
    return f"logged_model:{model_id}"


# Every snapshot marker has this key, whatever its snapshot: compaction keeps only the latest marker
# of each partition.
SNAPSHOT_MARKER_KEY = "snapshot"


def entity_key(kind: EntityKind, entity: Entity) -> str:
    """The change-topic key of an entity."""
    if kind == "EXPERIMENT":
        return experiment_key(entity["experiment_id"])  # type: ignore[typeddict-item]
    if kind == "RUN":
        return run_key(entity["run_id"])  # type: ignore[typeddict-item]
    if kind == "REGISTERED_MODEL":
        return registered_model_key(entity["name"])
    if kind == "MODEL_VERSION":
        return model_version_key(entity["name"], entity["version"])  # type: ignore[typeddict-item]
    if kind == "LOGGED_MODEL":
        return logged_model_key(entity["model_id"])  # type: ignore[typeddict-item]
    raise ValueError(f"no entity key for kind {kind}")


def kind_of_key(key: str) -> EntityKind:
    prefix = key.split(":", 1)[0]
    kinds: dict[str, EntityKind] = {
        "experiment": "EXPERIMENT",
        "run": "RUN",
        "registered_model": "REGISTERED_MODEL",
        "model_version": "MODEL_VERSION",
        "logged_model": "LOGGED_MODEL",
        "snapshot": "SNAPSHOT",
    }
    if prefix not in kinds:
        raise ValueError(f"unknown entity key {key!r}")
    return kinds[prefix]


def model_version_of_key(key: str) -> tuple[str, str]:
    """(name, version) of a `model_version:<name>/<version>` key; names may contain '/'."""
    name, _, version = key.split(":", 1)[1].rpartition("/")
    return name, version
