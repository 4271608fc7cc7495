"""Avro single-object encoding of change events (connector/codec.py)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import avro.schema
import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from mlflow.entities import Metric

from connector.contract import codec, envelope
from connector.contract.events import ChangeEvent
from connector.mlflow import entities as changes
from tests import mlflow_objects as mo

# The newest schema version: the one the codec writes with.
SCHEMA_FILE = max((Path(__file__).resolve().parents[2] / "schemas").glob("ChangeEvent.v*.avsc"),
                  key=lambda p: int(p.name.split(".")[1][1:]))


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) fingerprint, as the Avro specification defines it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def _events() -> dict[str, ChangeEvent]:
    model = mo.registered_model("team/classifier", aliases={"champion": "2"})
    run = mo.run(
        "r1",
        metrics=[Metric("loss", float("inf"), 1, 0), Metric("acc", 0.93, 2, 5)],
        datasets=[mo.dataset_input(), mo.dataset_input("meta", "http", schema=None)],
    )
    snapshot = mo.source(snapshot_id="s-1")
    return {
        "experiment": mo.changed("EXPERIMENT", changes.experiment_state(mo.experiment()), op="CREATE"),
        "deleted experiment": mo.changed(
            "EXPERIMENT", changes.experiment_state(mo.experiment(lifecycle_stage="deleted", tags={}))
        ),
        "run": mo.run_event(run, versions=[("team/classifier", "2")]),
        "running run": mo.run_event(mo.run(status="RUNNING", end_time=None, user_id="", run_name="")),
        "registered model": mo.changed("REGISTERED_MODEL", changes.registered_model_state(model)),
        "model without versions": mo.changed(
            "REGISTERED_MODEL",
            changes.registered_model_state(mo.registered_model(latest=[], description=None)),
        ),
        "model version": mo.model_version_event(mo.model_version("team/classifier", "2"), model, run),
        "model version without run": mo.model_version_event(
            mo.model_version(stage=None, run_id=None, user_id=None, description=None)
        ),
        "read": envelope.entity_changed(
            "READ", "EXPERIMENT", changes.experiment_state(mo.experiment()), snapshot, 3
        ),
        "snapshot begin": envelope.snapshot_marker("SNAPSHOT_BEGIN", "s-1", 6, snapshot, 4),
        "snapshot end": envelope.snapshot_marker(
            "SNAPSHOT_END", "s-1", 6, snapshot, 5, complete=True, entities=2**40
        ),
        **{
            f"delete {kind}": envelope.entity_deleted(key, kind, mo.source(), 6)  # type: ignore[arg-type]
            for kind, key in [
                ("EXPERIMENT", "experiment:1"),
                ("RUN", "run:r1"),
                ("REGISTERED_MODEL", "registered_model:team/classifier"),
                ("MODEL_VERSION", "model_version:team/classifier/2"),
            ]
        },
    }


EVENTS = _events()


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_round_trip(name: str) -> None:
    event = EVENTS[name]
    decoded = codec.decode(codec.encode(event))
    assert decoded == event
    assert codec.encode(decoded) == codec.encode(event)


def test_round_trip_covers_every_kind_and_operation() -> None:
    assert {e["kind"] for e in EVENTS.values()} == {
        "EXPERIMENT",
        "RUN",
        "REGISTERED_MODEL",
        "MODEL_VERSION",
        "SNAPSHOT",
    }
    assert {e["op"] for e in EVENTS.values()} == {
        "CREATE",
        "UPDATE",
        "DELETE",
        "READ",
        "SNAPSHOT_BEGIN",
        "SNAPSHOT_END",
    }


def test_delete_has_no_state() -> None:
    decoded = codec.decode(codec.encode(EVENTS["delete RUN"]))
    assert decoded["op"] == "DELETE" and decoded["after"] is None


def _spec_fingerprint() -> bytes:
    """The 8 header bytes the Avro specification asks for: CRC-64-AVRO of the parsing canonical
    form of the newest schemas/ChangeEvent.v*.avsc, little-endian."""
    canonical = to_parsing_canonical_form(json.loads(SCHEMA_FILE.read_text()))
    return struct.pack("<Q", _crc64_avro(canonical.encode()))


def test_reference_fingerprint_agrees_with_fastavro_and_apache_avro() -> None:
    # the Avro test suite's fingerprint of the schema "null"
    assert _crc64_avro(b'"null"') == 7195948357588979594
    canonical = to_parsing_canonical_form(json.loads(SCHEMA_FILE.read_text()))
    # fastavro, like Java's SchemaNormalization.fingerprint, gives the bytes in little-endian order
    assert bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")) == _spec_fingerprint()
    assert avro.schema.parse(SCHEMA_FILE.read_text()).fingerprint("CRC-64-AVRO") == _spec_fingerprint()


def test_header_is_magic_and_schema_fingerprint() -> None:
    for event in EVENTS.values():
        data = codec.encode(event)
        assert data[:2] == b"\xc3\x01"
        assert data[2:10] == codec.schema_fingerprint(codec.current_schema())
        assert data[2:10] == _spec_fingerprint()


def test_header_fingerprint_is_little_endian() -> None:
    assert codec.encode(EVENTS["run"])[2:10] == _spec_fingerprint()


def test_decode_reads_spec_compliant_single_object_encoding() -> None:
    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    event = EVENTS["snapshot begin"]
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body, schema, {**event, "after": ("io.github.mlflow_datahub.SnapshotMarker", event["after"])}
    )
    assert codec.decode(b"\xc3\x01" + _spec_fingerprint() + body.getvalue()) == event


def test_body_is_plain_avro_of_the_schema_file() -> None:
    """Any Avro reader with schemas/ChangeEvent.v1.avsc reads the body."""
    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    event = EVENTS["model version"]
    record = fastavro.schemaless_reader(io.BytesIO(codec.encode(event)[codec.HEADER_SIZE :]), schema)
    assert record == event


def test_encoding_is_deterministic() -> None:
    assert codec.encode(_events()["run"]) == codec.encode(EVENTS["run"])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc3",
        b"\xc3\x01\x00",
        b"\x00\x01" + bytes(8) + b"\x00",
        b'{"op": "CREATE"}',
        b"\xc3\x02" + codec.encode(EVENTS["run"])[2:],
        b"\x01\xc3" + codec.encode(EVENTS["run"])[2:],
    ],
    ids=["empty", "one byte", "short header", "no magic", "json", "wrong version byte", "swapped magic"],
)
def test_decode_rejects_non_single_object_encoding(data: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode(data)


def test_decode_rejects_unknown_fingerprint() -> None:
    data = codec.encode(EVENTS["run"])
    unknown = bytes(b ^ 0xFF for b in data[2:10])
    with pytest.raises(codec.DecodeError, match="fingerprint"):
        codec.decode(data[:2] + unknown + data[10:])
    reversed_ = data[2:10][::-1]
    assert reversed_ != data[2:10]
    with pytest.raises(codec.DecodeError, match="fingerprint"):
        codec.decode(data[:2] + reversed_ + data[10:])


@pytest.mark.parametrize("name", ["run", "snapshot end", "delete MODEL_VERSION"])
def test_decode_rejects_every_truncation(name: str) -> None:
    data = codec.encode(EVENTS[name])
    for size in range(len(data)):
        with pytest.raises(codec.DecodeError):
            codec.decode(data[:size])


def test_decode_rejects_corrupt_body() -> None:
    data = codec.encode(EVENTS["experiment"])
    with pytest.raises(codec.DecodeError):
        codec.decode(data[:10] + b"\x7f" + data[11:])  # op enum index 63 does not exist


def test_decode_rejects_none() -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode(None)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(codec.DecodeError, ValueError)


def test_encode_rejects_event_not_matching_the_schema() -> None:
    event = dict(EVENTS["experiment"])
    event["op"] = "MERGE"
    with pytest.raises(ValueError):
        codec.encode(event)  # type: ignore[arg-type]
