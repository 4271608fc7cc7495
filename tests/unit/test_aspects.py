"""The MCP topic's value serialisation, pure: the envelope laid out as plain data must give the bytes
DataHub's emitter conversion (`to_obj(tuples=True)`) gives, for every kind of proposal the mapping
makes, and fall back to avrogen for proposals it does not cover."""

from __future__ import annotations

import io

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import (
    GenericAspectClass,
    MLHyperParamClass,
    MLTrainingRunPropertiesClass,
    StatusClass,
    SystemMetadataClass,
    TagPropertiesClass,
)

from connector.datahub.aspects import envelope, proposal
from connector.datahub.decisions import PartitionState, Policy, decide
from connector.datahub.mapping import removal_mcps, stage_tag_mcps
from connector.kafka.mcp_serde import McpSerializer
from tests import mlflow_objects as mo
from tests.unit.test_mapping import DEFAULT, MCP_SCHEMA, experiment_event, model_event


def avro(record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, MCP_SCHEMA, record)
    return out.getvalue()


def sample_mcps() -> list[MetadataChangeProposalWrapper]:
    """What the consumer writes for a first snapshot of runs (with datasets and metrics), an
    experiment, a deleted experiment, a registered model and a version, and soft deletes."""
    state = PartitionState()
    policy = Policy(enabled=True)
    events = [
        experiment_event(mo.experiment()),
        experiment_event(mo.experiment(experiment_id="9", name="gone", lifecycle_stage="deleted")),
        mo.run_event(mo.run(datasets=[mo.dataset_input("d", "local")])),
        mo.run_event(mo.run(run_id="r2", status="RUNNING")),
        model_event(mo.registered_model()),
        mo.model_version_event(mo.model_version()),
    ]
    mcps: list[MetadataChangeProposalWrapper] = []
    for event in events:
        outcome = decide(event, state, policy, DEFAULT)
        state.apply(outcome.state)
        mcps += outcome.mcps
    mcps += removal_mcps("urn:li:dataProcessInstance:gone") + stage_tag_mcps()
    return mcps


def test_envelope_gives_the_emitters_bytes_for_every_proposal_the_mapping_makes() -> None:
    mcps = sample_mcps()
    names = {str(m.aspectName) for m in mcps}
    assert len(mcps) > 30 and {"mlTrainingRunProperties", "versionProperties", "status", "tagProperties"} <= names
    for mcp in mcps:
        metadata = mcp.systemMetadata.to_obj(tuples=True) if mcp.systemMetadata is not None else None
        record = envelope(mcp, metadata)
        assert record is not None, mcp
        assert avro(record) == avro(mcp.to_obj(tuples=True)), mcp
        # And the record reads back as the proposal DataHub's emitter would have written.
        back = fastavro.schemaless_reader(io.BytesIO(avro(record)), MCP_SCHEMA)
        assert MetadataChangeProposalWrapper.from_obj(back) == mcp


def test_envelope_without_system_metadata() -> None:
    mcp = MetadataChangeProposalWrapper(entityUrn="urn:li:corpuser:x", aspect=StatusClass(removed=True))
    assert avro(envelope(mcp, None)) == avro(mcp.to_obj(tuples=True))  # type: ignore[arg-type]


def test_envelope_leaves_key_aspects_audit_headers_and_headers_to_avrogen() -> None:
    base = MetadataChangeProposalWrapper(entityUrn="urn:li:corpuser:x", aspect=StatusClass(removed=False))
    assert envelope(base, None) is not None
    for changed in ({"headers": {"h": "v"}}, {"entityKeyAspect": StatusClass(removed=False)}):
        mcp = MetadataChangeProposalWrapper(entityUrn="urn:li:corpuser:x", aspect=StatusClass(removed=False),
                                            **changed)  # type: ignore[arg-type]
        assert envelope(mcp, None) is None


def test_serializer_converts_each_events_system_metadata_and_nothing_stale() -> None:
    """Proposals of one event share their system metadata object, converted once; a proposal with
    another object gets its own conversion, and proposals the envelope does not cover still get
    DataHub's bytes."""
    # no request is made by _to_dict
    serializer = McpSerializer(SchemaRegistryClient({"url": "http://127.0.0.1:9"}), "t")
    first = SystemMetadataClass(lastObserved=1, runId="a")
    second = SystemMetadataClass(lastObserved=2, runId="b")
    mcps = [MetadataChangeProposalWrapper(entityUrn=f"urn:li:corpuser:{i}", aspect=StatusClass(removed=False),
                                          systemMetadata=meta)
            for i, meta in enumerate([first, first, second, first])]
    mcps.append(MetadataChangeProposalWrapper(entityUrn="urn:li:corpuser:h", aspect=StatusClass(removed=False),
                                              systemMetadata=second, headers={"h": "v"}))
    for mcp in mcps:
        assert avro(serializer._to_dict(mcp, None)) == avro(mcp.to_obj(tuples=True))
    made = proposal(mcps[0])
    assert isinstance(made.aspect, GenericAspectClass)
    assert avro(serializer._to_dict(made, None)) == avro(made.to_obj(tuples=True))


@pytest.mark.parametrize("aspect_name", ["mlTrainingRunProperties", "dataProcessInstanceRunEvent"])
def test_envelope_follows_an_aspect_changed_in_place_after_forget(aspect_name: str) -> None:
    from connector.datahub.aspects import forget

    mcp = next(m for m in sample_mcps() if m.aspectName == aspect_name)
    before = avro(envelope(mcp, None))  # type: ignore[arg-type]
    if aspect_name == "mlTrainingRunProperties":
        mcp.aspect.hyperParams = []  # type: ignore[union-attr]
    else:
        mcp.aspect.timestampMillis += 1  # type: ignore[union-attr]
    forget(mcp)
    after = avro(envelope(mcp, None))  # type: ignore[arg-type]
    assert after != before
    mcp.systemMetadata = None
    assert after == avro(mcp.to_obj(tuples=True))


# ---- the aspect's JSON ----------------------------------------------------------------------------


def test_aspect_json_is_datahubs_for_every_aspect_the_mapping_makes() -> None:
    from datahub.emitter.mcp import _make_generic_aspect

    from connector.datahub.aspects import make_generic_aspect

    for mcp in sample_mcps():
        assert mcp.aspect is not None
        assert make_generic_aspect(mcp.aspect) == _make_generic_aspect(mcp.aspect), mcp


def test_aspect_that_fastavro_refuses_but_datahub_accepts_is_written_as_datahub_writes_it() -> None:
    """avrogen writes bytes as text in its JSON form, which fastavro's validator refuses: such an
    aspect takes DataHub's own path."""
    from avrogen.avrojson import get_global_json_converter
    from datahub.emitter.mcp import _make_generic_aspect
    from datahub.metadata.schema_classes import PlatformResourceInfoClass, SerializedValueClass
    from fastavro.validation import validate

    from connector.datahub.aspects import _avro_schema, make_generic_aspect

    aspect = PlatformResourceInfoClass(resourceType="user", primaryKey="alice", value=SerializedValueClass(
        blob=b'{"a": 1}', contentType="JSON"))
    converted = get_global_json_converter(False)._generic_to_json(aspect, aspect.RECORD_SCHEMA)
    assert not validate(converted, _avro_schema(PlatformResourceInfoClass), raise_errors=False)
    assert make_generic_aspect(aspect) == _make_generic_aspect(aspect)


@pytest.mark.parametrize("broken", [
    lambda: StatusClass(removed="yes"),  # type: ignore[arg-type]
    lambda: MLTrainingRunPropertiesClass(hyperParams=[MLHyperParamClass(name=None, value="1")]),  # type: ignore[arg-type]
    lambda: TagPropertiesClass(name=3),  # type: ignore[arg-type]
])
def test_invalid_aspect_fails_as_datahubs_emitter_fails(broken: object) -> None:
    from avrogen.avrojson import AvroTypeException
    from datahub.emitter.mcp import _make_generic_aspect

    from connector.datahub.aspects import make_generic_aspect

    with pytest.raises(AvroTypeException):
        _make_generic_aspect(broken())  # type: ignore[operator]
    with pytest.raises(AvroTypeException):
        make_generic_aspect(broken())  # type: ignore[operator]


# ---- the converter: avrogen's output, for every kind of union DataHub's aspects have ---------------


def _edge_records() -> list[object]:
    """Records with each kind of union: optional fields (null and one type) set and unset, unions of
    several types (a map of them, an array of them, records among them), unions inside arrays, an
    enum beside a string, defaults of every kind."""
    from datahub.metadata.schema_classes import (
        AuditStampClass,
        AzkabanJobTypeClass,
        ChangeAuditStampsClass,
        ChartInfoClass,
        DataJobInfoClass,
        MLModelPropertiesClass,
        NumberTypeClass,
        OtherSchemaClass,
        SchemaFieldClass,
        SchemaFieldDataTypeClass,
        SchemaMetadataClass,
        StringTypeClass,
        StructuredPropertiesClass,
        StructuredPropertyValueAssignmentClass,
    )

    stamps = ChangeAuditStampsClass(created=AuditStampClass(time=1, actor="urn:li:corpuser:a"))
    return [
        MLModelPropertiesClass(),
        MLModelPropertiesClass(description="d", hyperParameters={"s": "x", "i": 1, "f": 1.5, "b": True},
                               customProperties={"k": "v"}, tags=["t"], date=5),
        ChartInfoClass(title="t", description="", lastModified=stamps,
                       inputs=["urn:li:dataset:(urn:li:dataPlatform:mlflow,a,PROD)"]),
        DataJobInfoClass(name="j", type=AzkabanJobTypeClass.COMMAND),
        DataJobInfoClass(name="j", type="SQL", externalUrl="http://x"),
        StructuredPropertiesClass(properties=[StructuredPropertyValueAssignmentClass(
            propertyUrn="urn:li:structuredProperty:p", values=["a", 1.0, 2])]),
        SchemaMetadataClass(schemaName="s", platform="urn:li:dataPlatform:mlflow", version=0, hash="",
                            platformSchema=OtherSchemaClass(rawSchema="{}"), fields=[
                                SchemaFieldClass(fieldPath="a", nativeDataType="int",
                                                 type=SchemaFieldDataTypeClass(type=NumberTypeClass())),
                                SchemaFieldClass(fieldPath="b", nativeDataType="str", nullable=True,
                                                 type=SchemaFieldDataTypeClass(type=StringTypeClass()))]),
        SystemMetadataClass(lastObserved=7, runId="r", properties={"a": "b"},
                            aspectCreated=AuditStampClass(time=1, actor="urn:li:corpuser:a", message="m")),
        SystemMetadataClass(lastObserved=None, runId=None),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("tuples", [False, True])
def test_to_obj_is_avrogens_for_every_kind_of_union(tuples: bool) -> None:
    from connector.datahub.aspects import to_obj

    records = _edge_records() + [m.aspect for m in sample_mcps()] + \
        [m.systemMetadata for m in sample_mcps() if m.systemMetadata is not None]
    for record in records:
        assert to_obj(record, tuples=tuples) == record.to_obj(tuples=tuples), record  # type: ignore[attr-defined]


@pytest.mark.parametrize("broken", [
    lambda: MLTrainingRunPropertiesClass(outputUrls=("s3://a",)),  # type: ignore[arg-type]  # a tuple, not a list
    lambda: MLTrainingRunPropertiesClass(hyperParams=[MLHyperParamClass(name="n", value=5)]),  # type: ignore[arg-type]
    lambda: MLTrainingRunPropertiesClass(externalUrl=b"http://x"),  # type: ignore[arg-type]
    lambda: MLTrainingRunPropertiesClass(hyperParams=[StatusClass(removed=True)]),  # type: ignore[list-item]
    lambda: TagPropertiesClass(name="t", description=["d"]),  # type: ignore[arg-type]
])
def test_a_wrong_value_in_an_optional_field_fails_as_datahubs_emitter_fails(broken: object) -> None:
    """The converter picks an optional field's branch by the value's type without validating it;
    what is wrong is still refused, as DataHub refuses it."""
    from avrogen.avrojson import AvroTypeException
    from datahub.emitter.mcp import _make_generic_aspect

    from connector.datahub.aspects import make_generic_aspect

    with pytest.raises(AvroTypeException):
        _make_generic_aspect(broken())  # type: ignore[operator]
    with pytest.raises(AvroTypeException):
        make_generic_aspect(broken())  # type: ignore[operator]
