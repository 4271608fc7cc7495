"""Aspects as DataHub serialises them into an MCP, pure: the aspect's JSON (`make_mcp`'s
`_make_generic_aspect`: `to_obj()`, then `pre_json_transform`, then `json.dumps`), computed once per
proposal, and the MCP envelope as plain data for the Avro serializer.

The aspect's JSON is DataHub's, with one change of who validates: `to_obj()` runs avrogen's Python
validator over the whole aspect before converting it, and its converter validates again each value
of an optional field (a union with null) to pick the union's branch; that validation costs more
than the conversion. Here avrogen's converter runs with the branch of such a union picked from the
value's type (`Converter`), and fastavro's compiled validator checks the output against the
aspect's own Avro schema. What fastavro refuses, or what the converter cannot convert, goes through
`to_obj()` after all, so it fails exactly as DataHub's emitter would fail on it. The converter also
reads each record's fields and their defaults from the schema once, not once per value.

The envelope around the aspect is a handful of strings; converting it through avrogen costs as
much again as the aspect, so `envelope()` lays it out as plain data instead, and the system
metadata, shared by all proposals of a change event, is converted once per event
(`connector.kafka.mcp_serde`) by `to_obj`. `tests/unit/test_aspects.py` holds all of it to
DataHub's bytes.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from typing import Any

from avro.schema import Schema
from avrogen.avrojson import AvroJsonConverter, get_global_json_converter
from avrogen.dict_wrapper import DictWrapper
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.emitter.serialization_helper import pre_json_transform
from datahub.metadata.schema_classes import GenericAspectClass, MetadataChangeProposalClass, SystemMetadataClass
from fastavro import parse_schema
from fastavro.validation import validate as avro_validate

_MEMO = "_mlflow_datahub_generic_aspect"
_JSON_CONTENT_TYPE = "application/json"


@functools.cache
def _avro_schema(record_class: type[DictWrapper]) -> Any:
    return parse_schema(record_class.RECORD_SCHEMA.to_json())


class Converter(AvroJsonConverter):
    """avrogen's converter (the one `to_obj()` uses, with its settings), with two changes that leave
    its output the same:
    - a record's fields, and each default converted from its JSON, are read from the schema once
      per schema, not once per value;
    - in a union of null and one other type (an optional field), None takes the null branch and a
      value of that type's kind (a str for a string, a list for an array, a dict for a map, an object
      of that very record class for a record) takes the other, without validating the value
      first: the caller validates the whole output (`to_obj`). Any other value, and every other
      union, is left to avrogen's own choice, which validates.
    """

    def __init__(self, base: AvroJsonConverter) -> None:
        super().__init__(base.use_logical_types, base.logical_types, base.fastavro, base.schema_types)
        # id(schema) -> (schema, what is worked out from it); the schema is kept so its id stays its own
        self._records: dict[int, tuple[Schema, list[tuple[str, Schema, bool, Any]]]] = {}
        self._unions: dict[int, tuple[Schema, bool, Schema | None, str | None, bool]] = {}

    def _fields(self, record: Schema) -> list[tuple[str, Schema, bool, Any]]:
        """(name, type, has a default, the default as avrogen converts it) of each field."""
        known = self._records.get(id(record))
        if known is None or known[0] is not record:
            fields = [(f.name, f.type, f.has_default,
                       self.from_json_object(f.default, f.type) if f.has_default else None)
                      for f in record.fields]  # type: ignore[attr-defined]
            known = (record, fields)
            self._records[id(record)] = known
        return known[1]

    def _union(self, union: Schema) -> tuple[Schema, bool, Schema | None, str | None, bool]:
        """(union, has null, its one other type or None, that type's name, avrogen's unambiguity)."""
        known = self._unions.get(id(union))
        if known is None or known[0] is not union:
            branches = union.schemas  # type: ignore[attr-defined]
            others = [b for b in branches if b.type != "null"]
            only = others[0] if len(others) == 1 else None
            known = (union, len(others) < len(branches), only,
                     self._fullname(only) if only is not None else None, self._is_unambiguous_union(union))
            self._unions[id(union)] = known
        return known

    def _record_to_json(self, data_obj: Any, writers_schema: Schema) -> OrderedDict:
        result: OrderedDict = OrderedDict()
        get = data_obj.get
        for name, field_type, has_default, default in self._fields(writers_schema):
            if has_default:
                value = get(name, default)
                if value is None and default is None:
                    continue  # as avrogen: a null that is also the default is left out
            else:
                value = get(name)
            result[name] = self._generic_to_json(value, field_type)
        return result

    def _union_to_json(self, data_obj: Any, writers_schema: Schema, was_within_array: bool = False) -> Any:
        if not self.use_logical_types:
            _, has_null, only, name, unambiguous = self._union(writers_schema)
            if data_obj is None and has_null:
                return None
            if only is not None and _of_kind(data_obj, only):
                output = self._generic_to_json(data_obj, only)
                if self.fastavro:
                    return (name, output)
                if not was_within_array and unambiguous:
                    return output
                return {name: output}
        return super()._union_to_json(data_obj, writers_schema, was_within_array)


def _of_kind(value: Any, schema: Schema) -> bool:
    """Whether `value` is of the kind `schema` takes, by its Python type alone."""
    kind = schema.type
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "map":
        return isinstance(value, dict)
    if kind == "record":
        return isinstance(value, DictWrapper) and type(value).RECORD_SCHEMA.fullname == schema.fullname  # type: ignore[attr-defined]
    return False  # numbers, booleans, enums, bytes: avrogen's own validation is cheap for these


@functools.cache
def _converter(tuples: bool) -> Converter:
    return Converter(get_global_json_converter(tuples))


def to_obj(record: DictWrapper, tuples: bool = False) -> Any:
    """`record.to_obj(tuples=tuples)`: avrogen's conversion through `Converter`, validated by fastavro
    against the record's schema; what fastavro refuses, or the converter cannot convert, goes through
    `to_obj()` itself (which raises avrogen's AvroTypeException, as DataHub's emitter would)."""
    try:
        converted = _converter(tuples)._generic_to_json(record, record.RECORD_SCHEMA)
    except Exception:
        return record.to_obj(tuples=tuples)
    if avro_validate(converted, _avro_schema(type(record)), raise_errors=False):
        return converted
    return record.to_obj(tuples=tuples)


def make_generic_aspect(aspect: DictWrapper) -> GenericAspectClass:
    """acryl-datahub's `_make_generic_aspect(aspect)`, with `to_obj` for `aspect.to_obj()`."""
    return GenericAspectClass(value=json.dumps(pre_json_transform(to_obj(aspect))).encode(),
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
