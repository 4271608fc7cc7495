"""Change events -> DataHub MetadataChangeProposals. Pure: data in, data out, no I/O.

Mirrors DataHub's batch `MLflowSource` (same URNs, aspect names and values, built with the same
acryl-datahub classes) except for the deliberate fixes listed in docs/compatibility.md; each fix
is marked `FIX(...)` below with the name used there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import datahub.emitter.mce_builder as builder
from datahub.api.entities.dataprocess.dataprocess_instance import DataProcessInstance
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.emitter.mcp_builder import ExperimentKey
from datahub.ingestion.source.common.data_platforms import KNOWN_VALID_PLATFORM_NAMES
from datahub.ingestion.source.common.subtypes import MLAssetSubTypes
from datahub.metadata.schema_classes import (
    AuditStampClass,
    BaseDataClass,
    ContainerClass,
    DataPlatformInstanceClass,
    DataProcessInstanceInputClass,
    DataProcessInstanceOutputClass,
    DataProcessInstancePropertiesClass,
    DataProcessInstanceRunEventClass,
    DataProcessInstanceRunResultClass,
    DataProcessRunStatusClass,
    EdgeClass,
    GlobalTagsClass,
    MetadataAttributionClass,
    MLFeatureDataTypeClass,
    MLFeaturePropertiesClass,
    MLHyperParamClass,
    MLMetricClass,
    MLModelGroupPropertiesClass,
    MLModelPropertiesClass,
    MLTrainingRunPropertiesClass,
    PartitionSpecClass,
    PartitionTypeClass,
    PlatformResourceInfoClass,
    StatusClass,
    SubTypesClass,
    SystemMetadataClass,
    TagAssociationClass,
    TagPropertiesClass,
    TimeStampClass,
    TrainingDataClass,
    UpstreamClass,
    UpstreamLineageClass,
    VersionPropertiesClass,
    VersionTagClass,
    _Aspect,
)
from datahub.metadata.urns import DataPlatformUrn, DatasetUrn, MlFeatureUrn, MlModelGroupUrn, MlModelUrn, VersionSetUrn
from datahub.sdk.container import Container
from datahub.sdk.dataset import Dataset
from datahub.utilities.urn_encoder import UrnEncoder

from connector.contract.events import (
    ChangeEvent,
    DatasetInput,
    Experiment,
    Metric,
    ModelVersion,
    RegisteredModel,
    Run,
    Signature,
    SignatureColumn,
    Tag,
    kind_of_key,
    model_version_of_key,
)

PLATFORM = "mlflow"
PLATFORM_URN = str(DataPlatformUrn(PLATFORM))
DATAHUB_ACTOR = "urn:li:corpuser:datahub"

STAGES = (
    ("Production", "Production Stage for an ML model in MLflow Model Registry", "#308613"),
    ("Staging", "Staging Stage for an ML model in MLflow Model Registry", "#FACB66"),
    ("Archived", "Archived Stage for an ML model in MLflow Model Registry", "#5D7283"),
    ("None", "None Stage for an ML model in MLflow Model Registry", "#F2F4F5"),
)


@dataclass(frozen=True)
class MappingSettings:
    """The recipe fields that shape the MCPs."""

    env: str = "PROD"
    model_name_separator: str = "_"
    base_external_url: str | None = None
    materialize_dataset_inputs: bool = False
    source_mapping_to_platform: dict[str, str] = field(default_factory=dict)
    run_id: str = "mlflow-datahub"
    # Several MLflow servers in one DataHub: the instance is in the URNs of experiments (their container
    # key), model groups and models (`instance.name`, as DataHub's sources name datasets), and in the
    # `dataPlatformInstance` aspect of every entity of the MLflow platform. None: as the original.
    platform_instance: str | None = None


@dataclass(frozen=True)
class EntityMcps:
    """What one change event turns into.

    `primary_urn` is the DataHub entity that mirrors the MLflow entity (it can be soft-deleted);
    `mcps` are every proposal the event needs, those of shared entities (stage tags, users,
    datasets) included.
    """

    primary_urn: str | None
    mcps: list[MetadataChangeProposalWrapper]
    # Further URNs the event's key owns, as it owns its primary URN (soft-deleted when the key no longer
    # maps to them, or is gone): a registered model's features.
    owned_urns: tuple[str, ...] = ()


# ---- URNs -------------------------------------------------------------------------------------

MAX_URN_BYTES = 512
"""DataHub refuses a URN longer than this, URL-encoded (GMS's UrnValidationUtil.URN_NUM_BYTES_LIMIT)."""
_URL_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_ ")


class UrnTooLong(ValueError):
    """An entity URN of the event is over DataHub's limit: DataHub would reject every proposal for it,
    so the event cannot be written (the consumer sends it to the dead-letter topic)."""


def urn_bytes(urn: str) -> int:
    """A URN's length as DataHub measures it: URL-encoded as Java's URLEncoder does (letters, digits
    and `.-*_` stay, a space becomes `+`, any other byte of its UTF-8 is `%XX`)."""
    return sum(1 if byte in _URL_SAFE else 3 for byte in urn.encode())



@functools.lru_cache(maxsize=4096)  # every run event names its experiment's URN (a hash of a JSON key)
def experiment_urn(name: str, instance: str | None = None) -> str:
    return ExperimentKey(platform=PLATFORM_URN, id=name, instance=instance).as_urn()


def run_urn(run_id: str) -> str:
    return str(DataProcessInstance(id=run_id, orchestrator=PLATFORM).urn)


def _named_urn(urn_class: type[MlModelUrn] | type[MlModelGroupUrn], name: str, env: str) -> str:
    # FIX(reserved-characters): the original's make_ml_model(_group)_urn put the name in the URN as
    # it is, so `,` `(` `)` in a name broke the URN (DataHub rejects it). DataHub's typed URN class
    # encodes them (`a,b` -> `a%2Cb`) and validates the result; any other name gives the original's
    # URN unchanged. The name is encoded here, with the class's own encoder, and `env` is left as the
    # configuration gives it (the class would upper-case it itself): the URN is the original's
    # builder's with only the name encoded.
    return str(urn_class(PLATFORM_URN, UrnEncoder.encode_string(name), env, _allow_coercion=False))


def _in_instance(name: str, settings: MappingSettings) -> str:
    return f"{settings.platform_instance}.{name}" if settings.platform_instance else name


def model_group_urn(name: str, settings: MappingSettings) -> str:
    return _named_urn(MlModelGroupUrn, _in_instance(name, settings), settings.env)


def model_urn(name: str, version: str, settings: MappingSettings) -> str:
    return _named_urn(MlModelUrn, _in_instance(f"{name}{settings.model_name_separator}{version}", settings),
                      settings.env)


def feature_urn(model_name: str, column: str, settings: MappingSettings) -> str:
    """A model's input feature: namespace = the registered model (as its model group names it, with the
    platform instance), name = the signature's column name; both encoded as DataHub's typed URN
    classes do (`sepal length (cm)` -> `sepal length %28cm%29`)."""
    return str(MlFeatureUrn(UrnEncoder.encode_string(_in_instance(model_name, settings)),
                            UrnEncoder.encode_string(column), _allow_coercion=False))


def _instance_urn(settings: MappingSettings) -> str | None:
    if not settings.platform_instance:
        return None
    return builder.make_dataplatform_instance_urn(PLATFORM, settings.platform_instance)


def platform_instance_mcp(urn: str, settings: MappingSettings) -> list[MetadataChangeProposalWrapper]:
    """The `dataPlatformInstance` aspect of a model group or model, when an instance is set (the
    original writes none for them)."""
    instance = _instance_urn(settings)
    return [_mcp(urn, DataPlatformInstanceClass(platform=PLATFORM_URN, instance=instance))] if instance else []


def stage_tag_name(stage: str) -> str:
    return f"{PLATFORM}_{stage.lower()}"


def stage_tag_urn(stage: str) -> str:
    return builder.make_tag_urn(stage_tag_name(stage))


def user_urn(user_id: str | None) -> str:
    return f"urn:li:platformResource:{builder.datahub_guid({'platform': PLATFORM, 'user': user_id or 'mlflow'})}"


def version_set_urn(model_name: str) -> str:
    guid = builder.datahub_guid({"platform": PLATFORM, "name": model_name})
    return str(VersionSetUrn(id=guid, entity_type=MlModelUrn.ENTITY_TYPE))


def primary_urn_of_key(key: str, experiment_name: str | None, settings: MappingSettings) -> str | None:
    """The primary URN of a change key, where the key alone determines it."""
    kind = kind_of_key(key)
    ident = key.split(":", 1)[1]
    if kind == "RUN":
        return run_urn(ident)
    if kind == "REGISTERED_MODEL":
        return model_group_urn(ident, settings)
    if kind == "MODEL_VERSION":
        return model_urn(*model_version_of_key(key), settings)
    if kind == "EXPERIMENT" and experiment_name is not None:
        return experiment_urn(experiment_name, settings.platform_instance)
    return None


# ---- helpers ----------------------------------------------------------------------------------


def _dict(tags: Iterable[Tag]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in tags}


def _params(params: Iterable[Tag]) -> list[MLHyperParamClass]:
    return [MLHyperParamClass(name=p["key"], value=str(p["value"])) for p in params]


def _metrics(metrics: Iterable[Metric]) -> list[MLMetricClass]:
    return [MLMetricClass(name=m["key"], value=str(m["value"])) for m in metrics]


def _full_table() -> PartitionSpecClass:
    """The run event's default `partitionSpec`, given explicitly: the class builds its default by
    parsing the schema's JSON default on every construction (a third of `to_mcps`'s time for runs)."""
    return PartitionSpecClass(partition="FULL_TABLE_SNAPSHOT", type=PartitionTypeClass.FULL_TABLE)


def _mcp(urn: str, aspect: _Aspect) -> MetadataChangeProposalWrapper:
    return MetadataChangeProposalWrapper(entityUrn=urn, aspect=aspect)


def _status(urn: str, removed: bool) -> MetadataChangeProposalWrapper:
    return _mcp(urn, StatusClass(removed=removed))


def _base_url(event: ChangeEvent, settings: MappingSettings) -> str | None:
    if settings.base_external_url:
        return settings.base_external_url
    tracking_uri = event["source"]["tracking_uri"]
    return tracking_uri if tracking_uri.startswith("http") else None


def stage_tag_mcps() -> list[MetadataChangeProposalWrapper]:
    """The four stage tags that every model version may point at."""
    mcps = []
    for stage, description, color in STAGES:
        urn = stage_tag_urn(stage)
        mcps.append(_mcp(urn, TagPropertiesClass(name=stage_tag_name(stage), description=description, colorHex=color)))
        mcps.append(_status(urn, False))
    return mcps


def removal_mcp(urn: str) -> MetadataChangeProposalWrapper:
    """Soft delete, as DataHub's stale-entity removal does it."""
    return _status(urn, True)


def removal_mcps(urn: str) -> list[MetadataChangeProposalWrapper]:
    """Soft delete, plus what depends on the entity: a model version that is gone no longer
    carries its stage tag (the tag's page would otherwise still list it)."""
    mcps = [removal_mcp(urn)]
    if urn.startswith("urn:li:mlModel:"):
        mcps.append(_mcp(urn, GlobalTagsClass(tags=[])))
    return mcps


# ---- experiments ------------------------------------------------------------------------------


def experiment_mcps(experiment: Experiment, settings: MappingSettings) -> EntityMcps:
    tags = _dict(experiment["tags"])
    description = tags.pop("mlflow.note.content", None)
    tags["artifacts_location"] = experiment["artifact_location"] or ""
    container = Container(
        container_key=ExperimentKey(platform=PLATFORM_URN, id=experiment["name"], instance=settings.platform_instance),
        subtype=MLAssetSubTypes.MLFLOW_EXPERIMENT,
        display_name=experiment["name"],
        description=description,
        extra_properties=tags,
    )
    urn = str(container.urn)
    mcps = [cast(MetadataChangeProposalWrapper, wu.metadata) for wu in container.as_workunits()]
    # FIX(deleted-experiments): the original lists active experiments only; a deleted one is
    # mirrored with status removed=true (and removed=false again when it is restored).
    mcps.append(_status(urn, experiment["lifecycle_stage"] == "deleted"))
    return EntityMcps(urn, mcps)


# ---- runs -------------------------------------------------------------------------------------


def _run_result(status: str) -> str:
    return {"FINISHED": "SUCCESS", "FAILED": "FAILURE"}.get(status, "SKIPPED")


def _dataset_schema(dataset: DatasetInput) -> list[tuple[str, str]] | None:
    try:
        schema = json.loads(dataset["schema"] or "")
    except json.JSONDecodeError:
        return None
    if isinstance(schema, dict) and "mlflow_colspec" in schema:
        try:
            return [(f["name"], f["type"]) for f in schema["mlflow_colspec"]]
        except (KeyError, TypeError):
            return None
    return None


def _dataset_platform(source_type: str, settings: MappingSettings) -> str | None:
    source_type = source_type.lower()
    if settings.source_mapping_to_platform.get(source_type):
        return settings.source_mapping_to_platform[source_type]
    if source_type == "gs":
        return "gcs"
    return source_type if source_type in KNOWN_VALID_PLATFORM_NAMES else None


def dataset_input_urns(dataset_inputs: Iterable[DatasetInput], settings: MappingSettings) -> list[str]:
    """The URNs a run's `dataProcessInstanceInput` links, one per dataset input (as `_dataset_mcps`
    names them; an input skipped there for want of a platform is left out here too), without repeats."""
    urns: list[str] = []
    for dataset in dataset_inputs:
        if dataset["source_type"] not in ("local", "code") and settings.materialize_dataset_inputs \
                and not _dataset_platform(dataset["source_type"], settings):
            continue
        urns.append(str(DatasetUrn(platform=PLATFORM, name=dataset["name"], env=settings.env)))
    return list(dict.fromkeys(urns))


def _dataset_mcps(
    run: Run, settings: MappingSettings
) -> tuple[list[str], list[MetadataChangeProposalWrapper], list[str]]:
    """MCPs of the datasets a run read, the URNs to link as its inputs, and warnings."""
    urns: list[str] = []
    mcps: list[MetadataChangeProposalWrapper] = []
    warnings: list[str] = []
    for dataset in run["dataset_inputs"]:
        schema = _dataset_schema(dataset)
        # As in the original, the unparsed schema travels in the properties of every dataset made
        # for this input (it crashes on a dataset without a schema; none is written here).
        properties = _dict(dataset["tags"])
        if schema is None and dataset["schema"] is not None:
            properties["schema"] = dataset["schema"]
        # FIX(dataset-env): the original always puts datasets in PROD; they follow `env` here.
        if dataset["source_type"] in ("local", "code"):
            local = Dataset(platform=PLATFORM, name=dataset["name"], env=settings.env, schema=schema,
                            custom_properties=properties)
            mcps.extend(cast(MetadataChangeProposalWrapper, wu.metadata) for wu in local.as_workunits())
            urns.append(str(local.urn))
            continue
        platform = _dataset_platform(dataset["source_type"], settings)
        if settings.materialize_dataset_inputs:
            if not platform:
                warnings.append(f"run {run['run_id']}: no DataHub platform for dataset source type "
                                f"{dataset['source_type']!r}; add it to source_mapping_to_platform")
                continue
            hosted = Dataset(platform=platform, name=dataset["name"], env=settings.env, schema=schema,
                             custom_properties=properties)
            mcps.extend(cast(MetadataChangeProposalWrapper, wu.metadata) for wu in hosted.as_workunits())
        upstreams = (
            UpstreamLineageClass(upstreams=[UpstreamClass(str(DatasetUrn(platform=platform, name=dataset["name"],
                                                                         env=settings.env)), type="COPY")])
            if platform else None
        )
        reference = Dataset(platform=PLATFORM, name=dataset["name"], env=settings.env, schema=schema,
                            custom_properties=properties, upstreams=upstreams)
        mcps.extend(cast(MetadataChangeProposalWrapper, wu.metadata) for wu in reference.as_workunits())
        urns.append(str(reference.urn))
    for urn in dict.fromkeys(m.entityUrn for m in mcps if m.entityUrn):
        mcps.append(_status(urn, False))
    return urns, mcps, warnings


def run_mcps(run: Run, event: ChangeEvent, settings: MappingSettings) -> tuple[EntityMcps, list[str]]:
    urn = run_urn(run["run_id"])
    user = user_urn(run["user_id"])
    created = run["start_time"] or event["source"]["read_at_ms"]
    base = _base_url(event, settings)
    mcps = [
        _mcp(user, PlatformResourceInfoClass(resourceType="user", primaryKey=run["user_id"] or "mlflow")),
        _status(user, False),
        _mcp(urn, DataProcessInstancePropertiesClass(
            name=run["run_name"] or run["run_id"],
            created=AuditStampClass(time=created, actor=user),
            # FIX(run-external-url): the original ignores base_external_url for runs.
            externalUrl=f"{base.rstrip('/')}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
            if base else None,
            # FIX(run-tags): the original reads a `tags` attribute that MLflow runs do not have,
            # so run tags were always dropped.
            customProperties=_dict(run["tags"]),
        )),
        _mcp(urn, ContainerClass(container=experiment_urn(run["experiment_name"], settings.platform_instance))),
        # FIX(all-model-versions): the original links only the first version a run produced.
        # FIX(empty-edges): emitted also when empty, so that a deleted version's edge disappears.
        _mcp(urn, DataProcessInstanceOutputClass(
            outputs=[],
            outputEdges=[EdgeClass(destinationUrn=model_urn(v["name"], v["version"], settings))
                         for v in run["model_versions"]],
        )),
        _mcp(urn, MLTrainingRunPropertiesClass(
            hyperParams=_params(run["params"]),
            trainingMetrics=_metrics(run["metrics"]),
            outputUrls=[run["artifact_uri"]] if run["artifact_uri"] is not None else [],
            id=run["run_id"],
        )),
    ]
    if run["end_time"]:
        mcps.append(_mcp(urn, DataProcessInstanceRunEventClass(
            status=DataProcessRunStatusClass.COMPLETE,
            timestampMillis=run["end_time"],
            result=DataProcessInstanceRunResultClass(type=_run_result(run["status"]), nativeResultType=PLATFORM),
            durationMillis=run["end_time"] - (run["start_time"] or run["end_time"]),
            partitionSpec=_full_table(),
        )))
    elif run["start_time"]:
        # FIX(running-runs): the original gives a run in progress no run event at all.
        mcps.append(_mcp(urn, DataProcessInstanceRunEventClass(
            status=DataProcessRunStatusClass.STARTED, timestampMillis=run["start_time"],
            partitionSpec=_full_table(),
        )))
    mcps.append(_mcp(urn, DataPlatformInstanceClass(platform=PLATFORM_URN, instance=_instance_urn(settings))))
    mcps.append(_mcp(urn, SubTypesClass(typeNames=[MLAssetSubTypes.MLFLOW_TRAINING_RUN])))
    dataset_urns, dataset_mcps, warnings = _dataset_mcps(run, settings)
    mcps.extend(dataset_mcps)
    # FIX(empty-edges): emitted also when empty, so that an input that is gone disappears (the
    # original writes no input aspect for a run without inputs, and never clears one).
    mcps.append(_mcp(urn, DataProcessInstanceInputClass(
        inputs=[], inputEdges=[EdgeClass(destinationUrn=u) for u in dataset_urns])))
    # FIX(deleted-runs): runs MLflow marks deleted are soft-deleted too (the original exempts runs).
    mcps.append(_status(urn, run["lifecycle_stage"] == "deleted"))
    return EntityMcps(urn, mcps), warnings


# ---- registry ---------------------------------------------------------------------------------


def _latest_version(model: RegisteredModel) -> str | None:
    # FIX(latest-version): the original takes MLflow's first per-stage "latest version", which is
    # whichever stage comes first, not the newest version.
    versions = [int(v["version"]) for v in model["latest_versions"]]
    return str(max(versions)) if versions else None


# MLflow's column types -> DataHub's feature data types (docs/compatibility.md, "Features and training data").
# Integers are COUNT: a model's integer input is most often a count (items, visits, days); ORDINAL would
# claim an order of categories that the signature does not state.
COLUMN_DATA_TYPES = {
    "double": MLFeatureDataTypeClass.CONTINUOUS,
    "float": MLFeatureDataTypeClass.CONTINUOUS,
    "long": MLFeatureDataTypeClass.COUNT,
    "integer": MLFeatureDataTypeClass.COUNT,
    "string": MLFeatureDataTypeClass.TEXT,
    "boolean": MLFeatureDataTypeClass.BINARY,
}


def feature_data_type(column: SignatureColumn) -> str:
    """DataHub's `MLFeatureDataType` of a signature input: a column by its MLflow type, a named
    tensor by its numpy dtype (floats CONTINUOUS, integers COUNT, bool BINARY, str TEXT); UNKNOWN
    for every other type (binary, datetime, arrays, objects, maps, Any)."""
    kind = column["type"]
    if column["kind"] == "tensor":
        kind = ("double" if kind.startswith("float") else "long" if kind.startswith(("int", "uint"))
                else "boolean" if kind == "bool" else "string" if kind in ("str", "unicode") else kind)
    return COLUMN_DATA_TYPES.get(kind, MLFeatureDataTypeClass.UNKNOWN)


def _column_properties(column: SignatureColumn) -> dict[str, str]:
    out = {"mlflow.type": column["type"], "mlflow.kind": column["kind"],
           "mlflow.required": "false" if column["optional"] else "true"}
    if column["shape"] is not None:
        out["mlflow.shape"] = json.dumps(column["shape"])
    return out


def _fits(urn: str) -> bool:
    return len(urn.encode()) * 3 <= MAX_URN_BYTES or urn_bytes(urn) <= MAX_URN_BYTES


def _features(model: str, columns: Iterable[SignatureColumn], settings: MappingSettings
              ) -> list[tuple[str, SignatureColumn]]:
    """(feature URN, column) of the named inputs whose URN DataHub takes, without repeats."""
    out: dict[str, SignatureColumn] = {}
    for column in columns:
        if column["name"]:
            urn = feature_urn(model, column["name"], settings)
            if _fits(urn):
                out.setdefault(urn, column)
    return list(out.items())


def registered_model_mcps(model: RegisteredModel, settings: MappingSettings) -> tuple[EntityMcps, list[str]]:
    urn = model_group_urn(model["name"], settings)
    properties = MLModelGroupPropertiesClass(
        customProperties=_dict(model["tags"]),
        description=model["description"],
        created=TimeStampClass(time=cast(int, model["creation_timestamp"]), actor=None),
        lastModified=TimeStampClass(time=cast(int, model["last_updated_timestamp"]), actor=None),
        version=VersionTagClass(
            versionTag=_latest_version(model),
            metadataAttribution=MetadataAttributionClass(
                time=cast(int, model["last_updated_timestamp"]), actor=DATAHUB_ACTOR
            ),
        ),
    )
    mcps = [_mcp(urn, properties), _status(urn, False)]
    # Beyond the original: the model's features, one per named input of its live versions' signatures
    # (the producer joins them into the model's event). Owned by the registered model's key, so that a
    # feature no live version lists any more is soft-deleted (connector/datahub/decisions.py).
    columns = model.get("features") or []
    features = _features(model["name"], columns, settings)
    warnings = [f"registered model {_shown(model['name'])}: feature {_shown(str(c['name']))} not written, its URN "
                f"is over DataHub's limit of {MAX_URN_BYTES} bytes" for c in columns
                if c["name"] and not _fits(feature_urn(model["name"], c["name"], settings))]
    for feature, column in features:
        mcps.append(_mcp(feature, MLFeaturePropertiesClass(customProperties=_column_properties(column),
                                                           dataType=feature_data_type(column))))
        mcps.append(_status(feature, False))
    return EntityMcps(urn, mcps, tuple(feature for feature, _ in features)), warnings


def _signature_properties(signature: Signature | None) -> dict[str, str]:
    """The whole signature in the version's customProperties: inputs (tensors, unnamed columns
    included) and outputs, as MLflow's types name them."""
    if signature is None:
        return {}
    def shown(columns: list[SignatureColumn]) -> str:
        return json.dumps([{k: v for k, v in c.items() if v is not None} for c in columns], separators=(",", ":"))
    return {"mlflow.signature.inputs": shown(signature["inputs"]),
            "mlflow.signature.outputs": shown(signature["outputs"])}


def model_version_mcps(version: ModelVersion, event: ChangeEvent, settings: MappingSettings) -> EntityMcps:
    urn = model_urn(version["name"], version["version"], settings)
    run = version["run"]
    base = _base_url(event, settings)
    # FIX(version-creator): the original points at `urn:li:platformResource:<user id>`, an entity
    # nobody creates; the creator is the same user resource that runs point at.
    creator = user_urn(version["user_id"]) if version["user_id"] else None
    signature = version.get("signature")
    properties = MLModelPropertiesClass(
        # Beyond the original: the signature, as properties (outputs and tensors have no entity of their own).
        customProperties={**_dict(version["tags"]), **_signature_properties(signature)},
        externalUrl=f"{base.rstrip('/')}/#/models/{version['name']}/versions/{version['version']}" if base else None,
        lastModified=TimeStampClass(time=cast(int, version["last_updated_timestamp"]), actor=None),
        description=version["description"],
        created=TimeStampClass(time=cast(int, version["creation_timestamp"]), actor=creator),
        hyperParams=_params(run["params"]) if run else None,
        trainingMetrics=_metrics(run["metrics"]) if run else None,
        tags=[f"{t['key']}:{t['value']}" for t in version["tags"]],
        groups=[model_group_urn(version["name"], settings)],
        trainingJobs=[run_urn(run["run_id"])] if run else [],
        # Beyond the original: the features of its signature's named inputs (written by the model's event).
        mlFeatures=[u for u, _ in _features(version["name"], signature["inputs"], settings)] if signature else None,
    )
    version_properties = VersionPropertiesClass(
        version=VersionTagClass(
            versionTag=version["version"],
            metadataAttribution=MetadataAttributionClass(
                time=cast(int, version["creation_timestamp"]), actor=DATAHUB_ACTOR
            ),
        ),
        versionSet=version_set_urn(version["name"]),
        sortId=version["version"].zfill(10),
        # FIX(version-aliases): MLflow's version search returns no aliases, so the original always
        # wrote none; they come from the registered model here.
        aliases=[VersionTagClass(versionTag=alias) for alias in version["aliases"]],
    )
    mcps = stage_tag_mcps()
    if creator:
        user = PlatformResourceInfoClass(resourceType="user", primaryKey=cast(str, version["user_id"]))
        mcps += [_mcp(creator, user), _status(creator, False)]
    mcps += [
        _mcp(urn, properties),
        _mcp(urn, version_properties),
        # FIX(no-stage): a registry without stages (Unity Catalog: `current_stage` None) gets no stage tag;
        # the original fails on such a version.
        _mcp(urn, GlobalTagsClass(tags=[TagAssociationClass(tag=stage_tag_urn(stage))
                                        for stage in [version["current_stage"]] if stage])),
        _status(urn, False),
    ]
    if run:
        # Beyond the original: the data its training run consumed, the URNs of the run's
        # dataProcessInstanceInput (written also when empty, so that a change clears it).
        mcps.append(_mcp(urn, TrainingDataClass(trainingData=[
            BaseDataClass(dataset=u) for u in dataset_input_urns(run.get("dataset_inputs") or [], settings)])))
    mcps += platform_instance_mcp(urn, settings)
    mcps += platform_instance_mcp(urn, settings)
    return EntityMcps(urn, mcps)


def _shown(name: str, limit: int = 60) -> str:
    """A name for a log line: quoted, and cut if long."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _check_urn_lengths(event: ChangeEvent, entity: EntityMcps) -> None:
    """Raises UrnTooLong, naming the MLflow object, when a URN the event writes is over DataHub's limit."""
    for urn in dict.fromkeys(m.entityUrn for m in entity.mcps if m.entityUrn):
        if len(urn.encode()) * 3 <= MAX_URN_BYTES:
            continue  # short enough however it encodes (most URNs)
        size = urn_bytes(urn)
        if size <= MAX_URN_BYTES:
            continue
        after = cast(dict, event["after"])
        kind = event["kind"]
        if kind == "REGISTERED_MODEL":
            what = f"registered model {_shown(after['name'])}"
        elif kind == "MODEL_VERSION":
            what = f"model {_shown(after['name'])} version {after['version']}"
        elif kind == "RUN":
            what = f"run {after['run_id']}"
        else:
            what = f"{kind.lower()} {_shown(str(after.get('name', event['key'])))}"
        raise UrnTooLong(f"{what}: the URN {_shown(urn, 80)} is {size} bytes URL-encoded, over DataHub's limit "
                         f"of {MAX_URN_BYTES}; not written to DataHub")


# ---- entry point ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transformed:
    entity: EntityMcps | None
    warnings: list[str] = field(default_factory=list)


def to_mcps(event: ChangeEvent, settings: MappingSettings) -> Transformed:
    """The MCPs of one change event. Markers and deletes carry no entity state (None): what they
    mean depends on what is known to exist, which is the consumer's state, not the event's."""
    after = event["after"]
    if event["kind"] == "SNAPSHOT" or event["op"] == "DELETE" or after is None:
        return Transformed(None)
    if event["kind"] == "LOGGED_MODEL":
        # MLflow 3 LoggedModels travel on the change topic for other consumers; the original source
        # has no DataHub mapping for them and none is invented here (docs/compatibility.md).
        return Transformed(None)
    warnings: list[str] = []
    if event["kind"] == "EXPERIMENT":
        entity = experiment_mcps(cast(Experiment, after), settings)
    elif event["kind"] == "RUN":
        entity, warnings = run_mcps(cast(Run, after), event, settings)
    elif event["kind"] == "REGISTERED_MODEL":
        entity, warnings = registered_model_mcps(cast(RegisteredModel, after), settings)
    else:
        entity = model_version_mcps(cast(ModelVersion, after), event, settings)
    _check_urn_lengths(event, entity)
    system_metadata = SystemMetadataClass(lastObserved=event["source"]["read_at_ms"], runId=settings.run_id)
    for mcp in entity.mcps:
        mcp.systemMetadata = system_metadata
    return Transformed(entity, warnings)

