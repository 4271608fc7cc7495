"""Avro single-object encoding of change events (the Avro specification's registry-free framing).

A record is `C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form, then the Avro binary body. A reader needs only `schemas/`: it finds the
writer schema by fingerprint and resolves it to its own reader schema. This lets the change
topic live beside a read-only schema registry such as DataHub's.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from connector.contract.events import RECORD_NAMES, ChangeEvent

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
MAGIC = b"\xc3\x01"
HEADER_SIZE = 10


class DecodeError(ValueError):
    """A change-topic record that is not a change event of any known schema version."""


def _packaged_schema_dir() -> Path:
    packaged = Path(__file__).resolve().parents[1] / "schemas"  # connector.schemas, when installed
    return packaged if packaged.is_dir() else SCHEMA_DIR


@cache
def schema_versions() -> dict[int, dict[str, Any]]:
    """Every ChangeEvent schema version in `schemas/`, parsed, by version number."""
    versions = {}
    for path in sorted(_packaged_schema_dir().glob("ChangeEvent.v*.avsc")):
        number = int(path.name.split(".")[1][1:])
        versions[number] = fastavro.parse_schema(json.loads(path.read_text()))
    if not versions:
        raise FileNotFoundError(f"no ChangeEvent schemas in {_packaged_schema_dir()}")
    return versions


def current_schema() -> dict[str, Any]:
    versions = schema_versions()
    return versions[max(versions)]


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8 header bytes: fastavro's CRC-64-AVRO fingerprint is already in the spec's little-endian order."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@cache
def _writers_by_fingerprint() -> dict[bytes, dict[str, Any]]:
    return {schema_fingerprint(s): s for s in schema_versions().values()}


@cache
def _current_header() -> bytes:
    return MAGIC + schema_fingerprint(current_schema())


def encode(event: ChangeEvent) -> bytes:
    """Single-object encoding of a change event with the current schema."""
    schema = current_schema()
    record: dict[str, Any] = dict(event)
    after = event["after"]
    if after is not None:
        record["after"] = (RECORD_NAMES[event["kind"]], after)
    out = io.BytesIO()
    out.write(_current_header())
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def decode(data: bytes | None) -> ChangeEvent:
    """Decode a single-object-encoded change event into the current schema's shape."""
    if data is None:
        raise DecodeError("empty record value (tombstone) on the change topic")
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        raise DecodeError("not Avro single-object encoding (missing C3 01 header)")
    writer = _writers_by_fingerprint().get(data[2:HEADER_SIZE])
    if writer is None:
        raise DecodeError(f"unknown writer schema fingerprint {data[2:HEADER_SIZE].hex()}")
    try:
        record = fastavro.schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), writer, current_schema())
    except Exception as e:  # fastavro raises several types for corrupt bodies
        raise DecodeError(f"corrupt Avro body: {e}") from e
    return record  # type: ignore[return-value]
