"""Aspects as DataHub serialises them into an MCP, pure: the aspect's JSON (`make_mcp`'s
`_make_generic_aspect`: `to_obj()`, then `pre_json_transform`, then `json.dumps`), computed once per
proposal, and the MCP envelope as plain data for the Avro serializer.

The aspect's JSON is DataHub's, with one change of who validates: `to_obj()` runs avrogen's Python
validator over the whole aspect before converting it, which costs half as much again as the
conversion; here avrogen's converter runs alone and fastavro's compiled validator checks its
output against the aspect's own Avro schema. An aspect fastavro refuses goes through `to_obj()`
after all, so it fails exactly as DataHub's emitter would fail on it.

The envelope around the aspect is a handful of strings; converting it through avrogen costs as
much again as the aspect, so `envelope()` lays it out as plain data instead, and the system
metadata, shared by all proposals of a change event, is converted once per event
(`connector.kafka.mcp_serde`). `tests/unit/test_mcp_serde.py` holds both to DataHub's bytes.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from avrogen.avrojson import get_global_json_converter
from avrogen.dict_wrapper import DictWrapper
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.emitter.serialization_helper import pre_json_transform
from datahub.metadata.schema_classes import GenericAspectClass, MetadataChangeProposalClass, SystemMetadataClass
from fastavro import parse_schema
from fastavro.validation import validate as avro_validate

_MEMO = "_mlflow_datahub_generic_aspect"
_JSON_CONTENT_TYPE = "application/json"


@functools.cache
def _avro_schema(aspect_class: type[DictWrapper]) -> Any:
    return parse_schema(aspect_class.RECORD_SCHEMA.to_json())


def aspect_to_obj(aspect: DictWrapper) -> Any:
    """`aspect.to_obj()`: avrogen's own conversion (the converter `to_obj` uses), validated by
    fastavro against the aspect's schema; what fastavro refuses goes through `to_obj()` itself."""
    converted = get_global_json_converter(False)._generic_to_json(aspect, aspect.RECORD_SCHEMA)
    if avro_validate(converted, _avro_schema(type(aspect)), raise_errors=False):
        return converted
    return aspect.to_obj()  # raises avrogen's AvroTypeException, as DataHub's emitter would


def make_generic_aspect(aspect: DictWrapper) -> GenericAspectClass:
    """acryl-datahub's `_make_generic_aspect(aspect)`, with `aspect_to_obj` for `to_obj()`."""
    return GenericAspectClass(value=json.dumps(pre_json_transform(aspect_to_obj(aspect))).encode(),
                              contentType=_JSON_CONTENT_TYPE)


def generic_aspect(mcp: MetadataChangeProposalWrapper) -> GenericAspectClass:
    """The aspect as DataHub serialises it into the MCP (`make_mcp`'s own `_make_generic_aspect`),
    computed once per proposal: the state's fingerprint and the Avro value both use it."""
    cached = mcp.__dict__.get(_MEMO)
    if cached is not None and cached[0] is mcp.aspect:
        return cached[1]
    assert mcp.aspect is not None
    generic = make_generic_aspect(mcp.aspect)
    mcp.__dict__[_MEMO] = (mcp.aspect, generic)
    return generic


def forget(mcp: MetadataChangeProposalWrapper) -> MetadataChangeProposalWrapper:
    """Drop the cached serialisation (before changing the aspect in place)."""
    mcp.__dict__.pop(_MEMO, None)
    return mcp


def proposal(mcp: MetadataChangeProposalWrapper) -> MetadataChangeProposalClass:
    """`mcp.make_mcp()`, reusing the cached aspect serialisation. `MetadataChangeProposalWrapper.to_obj`
    is `make_mcp().to_obj()`, so the emitter's bytes and these are the same."""
    if mcp.entityKeyAspect is not None:
        return mcp.make_mcp()
    made = mcp._make_mcp_without_aspects()
    made.aspect = generic_aspect(mcp)
    return made


_GENERIC_ASPECT = GenericAspectClass.RECORD_SCHEMA.fullname.lstrip(".")
_SYSTEM_METADATA = SystemMetadataClass.RECORD_SCHEMA.fullname.lstrip(".")


def envelope(mcp: MetadataChangeProposalWrapper, system_metadata: dict | None) -> dict[str, Any] | None:
    """The record `proposal(mcp).to_obj(tuples=True)` gives, as plain data: `system_metadata` is
    `mcp.systemMetadata.to_obj(tuples=True)`. None for a proposal with parts this layout does not
    cover (a key aspect, an audit header, headers): those go through avrogen."""
    if mcp.entityKeyAspect is not None or mcp.auditHeader is not None or mcp.headers is not None \
            or mcp.aspect is None:
        return None
    generic = generic_aspect(mcp)
    record: dict[str, Any] = {
        "entityType": mcp.entityType,
        "entityUrn": ("string", str(mcp.entityUrn)),
        "changeType": str(mcp.changeType),
        "aspectName": ("string", str(mcp.aspectName)),
        "aspect": (_GENERIC_ASPECT, {"value": generic.value, "contentType": generic.contentType}),
    }
    if system_metadata is not None:
        record["systemMetadata"] = (_SYSTEM_METADATA, system_metadata)
    return record
