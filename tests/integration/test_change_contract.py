"""The change topic as a public contract (schemas/README.md).

1. Evolution rule: every ChangeEvent schema version reads data written with every earlier version.
   Checked two ways for each version N > 1 against versions 1..N-1:
   - Avro schema resolution with fastavro on sample records generated from the writer schema (every
     union branch, enum symbol, null/non-null and empty/non-empty shape): reading succeeds and
     preserves the values (fields only the reader has take their defaults);
   - the schema registry's compatibility check (Apicurio's Confluent-compatible API): the earlier
     versions registered under a throwaway subject with BACKWARD_TRANSITIVE, then the candidate
     tested against the latest and against all versions.
   With only v1 present, the same two checks run on mutations of the newest schema, some allowed by
   the rule and some not, so both checks are shown to pass and to fail where they should.
2. A second, independent consumer group (examples/independent_consumer.py, which uses nothing of
   the connector) reads every event of the change topic while `mlflow-datahub run` runs.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro.schema import expand_schema

from connector.contract import codec
from connector.datahub.mapping import experiment_urn, primary_urn_of_key
from connector.devstack.mlflow_server import MlflowServer
from connector.kafka.topics import ensure_topics
from tests.conftest import REPO, ConfigFactory, Kafka, read_to_end

SCHEMA_DIR = REPO / "schemas"
EXAMPLE = REPO / "examples" / "independent_consumer.py"


def _schema_files() -> dict[int, Path]:
    files = {}
    for path in SCHEMA_DIR.glob("ChangeEvent.v*.avsc"):
        files[int(path.name.split(".")[1].removeprefix("v"))] = path
    return dict(sorted(files.items()))


FILES = _schema_files()
NEWEST = max(FILES)


def _raw(version: int) -> dict[str, Any]:
    return json.loads(FILES[version].read_text())


# ---- sample records generated from a writer schema ----------------------------------------------

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
NAMED = {"record", "enum", "fixed"}


def _type(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    return schema["type"] if isinstance(schema["type"], str) else _type(schema["type"])


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _branch_name(schema: Any) -> str:
    """fastavro's name of a union branch in tuple notation: the full name, or the type."""
    return schema["name"] if _type(schema) in NAMED else _type(schema)


def _shapes(schema: Any, path: str, out: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Every shape that samples must cover: union branches, enum symbols, empty/non-empty collections."""
    kind = _type(schema)
    if kind == "union":
        for branch in schema:
            out.add((path, _branch_name(branch)))
            _shapes(branch, f"{path}|{_branch_name(branch)}", out)
    elif kind == "record":
        for field in schema["fields"]:
            _shapes(field["type"], f"{path}.{field['name']}", out)
    elif kind == "enum":
        out.update((path, symbol) for symbol in schema["symbols"])
    elif kind in ("array", "map"):
        out.update({(path, "empty"), (path, "items")})
        _shapes(schema["items" if kind == "array" else "values"], f"{path}[]", out)
    return out


class Sampler:
    """Random but reproducible records of a schema; unions in fastavro's (branch, value) notation so
    that the written branch is known when comparing."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: set[tuple[str, str]] = set()
        self.counter = 0

    def value(self, schema: Any, path: str) -> Any:
        kind = _type(schema)
        self.counter += 1
        n = self.counter
        if kind == "union":
            branch = self.rng.choice(schema)
            self.seen.add((path, _branch_name(branch)))
            return (_branch_name(branch), self.value(branch, f"{path}|{_branch_name(branch)}"))
        if kind == "record":
            return {f["name"]: self.value(f["type"], f"{path}.{f['name']}") for f in schema["fields"]}
        if kind == "enum":
            symbol = self.rng.choice(schema["symbols"])
            self.seen.add((path, symbol))
            return symbol
        if kind in ("array", "map"):
            size = self.rng.choice([0, 1, 2])
            self.seen.add((path, "items" if size else "empty"))
            inner = schema["items" if kind == "array" else "values"]
            items = [self.value(inner, f"{path}[]") for _ in range(size)]
            return items if kind == "array" else {f"k{i}-{n}": v for i, v in enumerate(items)}
        if kind == "fixed":
            return bytes(self.rng.randrange(256) for _ in range(schema["size"]))
        return {
            "null": None,
            "boolean": n % 2 == 0,
            "int": self.rng.randrange(-(2**31), 2**31),
            "long": self.rng.choice([0, -1, 2**31 + n, -(2**62) + n, 1_760_000_000_000 + n]),
            "float": float(n) + 0.5,
            "double": self.rng.choice([0.0, -1.25, 1e300, 2.0**-1070, n / 8]),
            "bytes": bytes([n % 256, 0, 255]),
            "string": self.rng.choice(["", f"s{n}", f"team/model ü {n}", f"model_version:a/b/{n}"]),
        }[kind]


def samples(writer: dict[str, Any], seed: int = 7, limit: int = 5000) -> list[dict[str, Any]]:
    """Records of the writer schema until every shape of it is covered (a few hundred for v1)."""
    schema = expand_schema(writer)
    wanted = _shapes(schema, "", set())
    sampler = Sampler(seed)
    records = []
    while not wanted <= sampler.seen:
        assert len(records) < limit, f"shapes never generated: {sorted(wanted - sampler.seen)[:5]}"
        records.append(sampler.value(schema, ""))
    return records


# ---- checking that resolution preserved the values ----------------------------------------------

PROMOTIONS = {"int": {"long", "float", "double"}, "long": {"float", "double"}, "float": {"double"},
              "string": {"bytes"}, "bytes": {"string"}}


def _matches(writer: Any, reader: Any) -> bool:
    """Avro's rule for picking the reader's union branch for a writer's type."""
    w, r = _type(writer), _type(reader)
    if w in NAMED or r in NAMED:
        return w == r and (_short(writer["name"]) == _short(reader["name"])
                           or writer["name"] in reader.get("aliases", [])
                           or _short(writer["name"]) in reader.get("aliases", []))
    return w == r or r in PROMOTIONS.get(w, set())


def _expect_same(written: Any, read: Any, writer: Any, reader: Any, path: str, problems: list[str]) -> None:
    w = _type(writer)
    if w == "union":
        name, written = written
        writer = next(b for b in writer if _branch_name(b) == name)
        w = _type(writer)
    if _type(reader) == "union":
        branch = next((b for b in reader if _matches(writer, b)), None)
        if branch is None:
            problems.append(f"{path}: no reader branch for {w}")
            return
        reader = branch
    r = _type(reader)
    if w == "record":
        writer_fields = {f["name"]: f for f in writer["fields"]}
        if set(read) != {f["name"] for f in reader["fields"]}:
            problems.append(f"{path}: read fields {sorted(read)} are not the reader's")
            return
        for field in reader["fields"]:
            source = next((writer_fields[n] for n in [field["name"], *field.get("aliases", [])]
                           if n in writer_fields), None)
            here = f"{path}.{field['name']}"
            if source is None:
                if read[field["name"]] != field.get("default"):
                    problems.append(f"{here}: new field read as {read[field['name']]!r}, not its default")
            else:
                _expect_same(written[source["name"]], read[field["name"]], source["type"], field["type"],
                             here, problems)
    elif w == "enum":
        expected = written if written in reader["symbols"] else reader.get("default")
        if read != expected:
            problems.append(f"{path}: enum {written!r} read as {read!r}")
    elif w == "array":
        if len(read) != len(written):
            problems.append(f"{path}: {len(written)} items read as {len(read)}")
            return
        for i, (a, b) in enumerate(zip(written, read, strict=True)):
            _expect_same(a, b, writer["items"], reader["items"], f"{path}[{i}]", problems)
    elif w == "map":
        if set(read) != set(written):
            problems.append(f"{path}: map keys changed")
            return
        for k in written:
            _expect_same(written[k], read[k], writer["values"], reader["values"], f"{path}[{k}]", problems)
    else:
        expected = written
        if w != r:
            expected = (written.encode() if r == "bytes" else written.decode() if r == "string"
                        else float(written) if r in ("float", "double") else written)
        if read != expected or type(read) is not type(expected):
            problems.append(f"{path}: {written!r} ({w}) read as {read!r} ({r})")


def fastavro_problems(writer: dict[str, Any], reader: dict[str, Any]) -> list[str]:
    """Write samples with `writer`, read them with `reader`; what failed or changed on the way."""
    w_parsed, r_parsed = fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    w_expanded, r_expanded = expand_schema(writer), expand_schema(reader)
    problems: list[str] = []
    for record in samples(writer):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, w_parsed, record)
        try:
            read = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), w_parsed, r_parsed)
        except Exception as e:  # SchemaResolutionError and friends: the data cannot be read
            problems.append(f"not readable: {type(e).__name__}: {e}")
            continue
        _expect_same(record, read, w_expanded, r_expanded, "", problems)
    return problems


# ---- the registry's verdict ---------------------------------------------------------------------


def registry_verdict(url: str, earlier: list[dict[str, Any]], candidate: dict[str, Any]) -> tuple[bool, bool]:
    """(compatible with the latest earlier version, compatible with all of them) under
    BACKWARD_TRANSITIVE, on a throwaway subject of the shared registry."""
    client = SchemaRegistryClient({"url": url})
    subject = f"test-change-contract-{uuid.uuid4().hex[:12]}-value"
    try:
        client.set_compatibility(subject, "BACKWARD_TRANSITIVE")
        assert client.get_compatibility(subject) == "BACKWARD_TRANSITIVE"
        for schema in earlier:
            client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
        assert len(client.get_versions(subject)) == len(earlier)
        proposed = Schema(json.dumps(candidate), "AVRO")
        return client.test_compatibility(subject, proposed), client.test_compatibility_all_versions(subject, proposed)
    finally:
        for permanent in (False, True):
            try:
                client.delete_subject(subject, permanent=permanent)
            except Exception:  # nothing registered, or already gone
                pass


# ---- the schema files ---------------------------------------------------------------------------


def test_schema_files_are_the_codecs_versions() -> None:
    assert list(FILES) == list(range(1, NEWEST + 1)), f"versions must be 1..N without gaps: {list(FILES)}"
    assert sorted(codec.schema_versions()) == list(FILES), "connector/codec.py must load every schemas/ file"
    for version, path in FILES.items():
        raw = json.loads(path.read_text())
        assert raw["type"] == "record" and _short(raw["name"]) == "ChangeEvent", path
        assert codec.schema_fingerprint(fastavro.parse_schema(raw)) == codec.schema_fingerprint(
            codec.schema_versions()[version]), f"{path.name} differs from the schema the codec loaded"
    # What the connector writes is the newest version.
    newest = fastavro.parse_schema(_raw(NEWEST))
    sample = samples(_raw(NEWEST))[0]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, newest, sample)
    encoded = codec.MAGIC + codec.schema_fingerprint(newest) + body.getvalue()
    assert codec.current_schema() is codec.schema_versions()[NEWEST]
    codec.decode(encoded)


# ---- the evolution rule on the real versions ----------------------------------------------------

LATER_VERSIONS = [pytest.param(n, id=f"v{n}") for n in FILES if n > 1] or [
    pytest.param(None, marks=pytest.mark.skip(
        reason=f"only ChangeEvent.v{NEWEST} exists: no earlier version to check yet (mutations below run)"))]


@pytest.mark.parametrize("version", LATER_VERSIONS)
def test_version_reads_every_earlier_version(version: int, kafka: Kafka) -> None:
    reader = _raw(version)
    for earlier in range(1, version):
        problems = fastavro_problems(_raw(earlier), reader)
        assert not problems, f"v{version} cannot read v{earlier} data: {problems[:5]}"
    latest, every = registry_verdict(kafka.registry, [_raw(n) for n in range(1, version)], reader)
    assert latest, f"registry: v{version} is not BACKWARD compatible with v{version - 1}"
    assert every, f"registry: v{version} is not BACKWARD_TRANSITIVE compatible with v1..v{version - 1}"
    if version == NEWEST:
        # The connector's own decoder turns old-version records into newest-version events.
        reader_expanded = expand_schema(reader)
        for earlier in range(1, version):
            writer = fastavro.parse_schema(_raw(earlier))
            for record in samples(_raw(earlier))[:50]:
                body = io.BytesIO()
                fastavro.schemaless_writer(body, writer, record)
                event = codec.decode(codec.MAGIC + codec.schema_fingerprint(writer) + body.getvalue())
                problems: list[str] = []
                _expect_same(record, event, expand_schema(_raw(earlier)), reader_expanded, "", problems)
                assert not problems, problems[:5]


# ---- the checks themselves, on possible next versions -------------------------------------------


def _named(schema: Any, name: str) -> dict[str, Any]:
    """The definition of a named type (record or enum) inside a raw schema."""
    if isinstance(schema, dict):
        if isinstance(schema.get("type"), str) and schema["type"] in NAMED and _short(schema["name"]) == name:
            return schema
        children: list[Any] = [v for k, v in schema.items() if k in ("type", "items", "values", "fields")]
    elif isinstance(schema, list):
        children = schema
    else:
        children = []
    for child in children:
        try:
            return _named(child, name)
        except KeyError:
            pass
    raise KeyError(name)


def _field(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in record["fields"] if f["name"] == name)


def _after_union(schema: dict[str, Any]) -> list[Any]:
    return _field(schema, "after")["type"]


def _replace_field(record: dict[str, Any], field: dict[str, Any]) -> None:
    fields = record["fields"]
    fields[fields.index(_field(record, field["name"]))] = field


Mutation = Callable[[dict[str, Any]], None]

ALLOWED: dict[str, Mutation] = {
    "optional field added": lambda s: s["fields"].append(
        {"name": "origin", "type": ["null", "string"], "default": None}),
    "field with default added to Run": lambda s: _named(s, "Run")["fields"].append(
        {"name": "child_run_ids", "type": {"type": "array", "items": "string"}, "default": []}),
    "enum symbol added": lambda s: _named(s, "Operation")["symbols"].append("TRUNCATE"),
    "union branch added (new entity kind)": lambda s: _after_union(s).append(
        {"type": "record", "name": "Prompt", "fields": [{"name": "name", "type": "string"}]}),
    "field removed": lambda s: _named(s, "Run")["fields"].remove(_field(_named(s, "Run"), "user_id")),
    "int promoted to long": lambda s: _field(_named(s, "SnapshotMarker"), "partitions").update(type="long"),
    "field renamed with alias": lambda s: _field(_named(s, "Experiment"), "name").update(
        name="experiment_name", aliases=["name"]),
    "record renamed with alias": lambda s: _named(s, "Experiment").update(name="ExperimentState",
                                                                           aliases=["Experiment"]),
}

FORBIDDEN: dict[str, Mutation] = {
    "required field added": lambda s: s["fields"].append({"name": "origin", "type": "string"}),
    "required field added to Run": lambda s: _named(s, "Run")["fields"].append({"name": "owner", "type": "string"}),
    "enum symbol removed": lambda s: _named(s, "Operation")["symbols"].remove("READ"),
    "field type changed": lambda s: _field(s, "ts_ms").update(type="string"),
    "nullable field made required": lambda s: _replace_field(_named(s, "Run"), {"name": "run_name", "type": "string"}),
    "union branch removed": lambda s: _after_union(s).remove(_named(_after_union(s), "SnapshotMarker")),
    "record renamed without alias": lambda s: _named(s, "Experiment").update(name="ExperimentState"),
}


def _mutated(mutation: Mutation) -> dict[str, Any]:
    schema = copy.deepcopy(_raw(NEWEST))
    mutation(schema)
    assert schema != _raw(NEWEST)
    fastavro.parse_schema(schema)  # still a valid schema
    return schema


@pytest.mark.parametrize("name", ALLOWED)
def test_checks_accept_an_allowed_next_version(name: str, kafka: Kafka) -> None:
    candidate = _mutated(ALLOWED[name])
    problems = fastavro_problems(_raw(NEWEST), candidate)
    assert not problems, problems[:5]
    assert registry_verdict(kafka.registry, [_raw(n) for n in FILES], candidate) == (True, True)


@pytest.mark.parametrize("name", FORBIDDEN)
def test_checks_refuse_a_forbidden_next_version(name: str, kafka: Kafka) -> None:
    candidate = _mutated(FORBIDDEN[name])
    assert fastavro_problems(_raw(NEWEST), candidate), "fastavro read every sample record"
    assert registry_verdict(kafka.registry, [_raw(n) for n in FILES], candidate) == (False, False)


# ---- an independent consumer group --------------------------------------------------------------


def test_example_uses_nothing_of_the_connector() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert "connector" not in modules and "tests" not in modules
    assert {"fastavro", "confluent_kafka"} <= modules


def _example(kafka: Kafka, topic: str, group: str, *extra: str, schemas: Path = SCHEMA_DIR) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--bootstrap", kafka.bootstrap, "--topic", topic, "--group", group,
            "--schemas", str(schemas), *extra]


def _wait(what: str, condition: Callable[[], bool], timeout: float, alive: subprocess.Popen[bytes],
          log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive.poll() is None, f"{what}: process exited with {alive.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _committed(bootstrap: str, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = client.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        client.close()


def _records_written(bootstrap: str, topic: str, partitions: int) -> int:
    """Sum of the high watermarks; 0 while a new topic's partitions have no leader yet."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-change-contract-watermarks"})
    try:
        return sum(client.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    except KafkaException:
        return 0
    finally:
        client.close()


def test_independent_consumer_group_reads_every_event(demo_mlflow: MlflowServer, kafka: Kafka,
                                                      make_config: ConfigFactory, tmp_path: Path) -> None:
    path, cfg = make_config(demo_mlflow.uri)
    topics = cfg.kafka.topics
    partitions = ensure_topics(cfg)[topics.changes]
    connector_log = tmp_path / "connector.log"
    with open(connector_log, "wb") as log:
        connector = subprocess.Popen([sys.executable, "-m", "connector.cli", "run", "-c", str(path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        # The example starts once the connector's snapshot has begun, and reads beside its consumer.
        _wait("the first change events", lambda: _records_written(kafka.bootstrap, topics.changes, partitions) > 0,
              180, connector, connector_log)
        group = f"{cfg.kafka.consumer_group}-independent"
        out, err = tmp_path / "independent.jsonl", tmp_path / "independent.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            example = subprocess.run(
                _example(kafka, topics.changes, group, "--json", "--exit-when-idle", "10"),
                stdout=stdout, stderr=stderr, cwd=tmp_path, timeout=300,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert example.returncode == 0, err.read_text()[-3000:]

        # What is on the topic, read by the test with the connector's own decoder.
        expected = [{"partition": m.partition(), "offset": m.offset(), "key": m.key().decode(),
                     "event": codec.decode(m.value())} for m in read_to_end(kafka.bootstrap, topics.changes)]
        printed = [json.loads(line) for line in out.read_text().splitlines()]
        by_partition: dict[int, list[int]] = {}
        for line in printed:
            by_partition.setdefault(line["partition"], []).append(line["offset"])
        assert all(offsets == sorted(offsets) for offsets in by_partition.values()), "per-partition order"
        assert sorted(printed, key=lambda e: (e["partition"], e["offset"])) == sorted(
            expected, key=lambda e: (e["partition"], e["offset"]))
        ops = [e["event"]["op"] for e in expected]
        assert ops.count("SNAPSHOT_BEGIN") == ops.count("SNAPSHOT_END") == partitions
        assert ops.count("READ") == 16  # the demo's entities
        assert f"{len(expected)} events read, 0 records skipped" in err.read_text()

        # The connector's own group processed the same events: its committed offsets are past the last
        # event of every partition, and every entity's primary URN has MCPs.
        last = {}
        for e in expected:
            last[e["partition"]] = max(last.get(e["partition"], -1), e["offset"])
        _wait("the connector's consumer group",
              lambda: all(_committed(kafka.bootstrap, cfg.kafka.consumer_group, topics.changes, list(last))[p] > o
                          for p, o in last.items()), 180, connector, connector_log)
        mcp_keys = {m.key().decode() for m in read_to_end(kafka.bootstrap, topics.mcp)}
        settings = cfg.mapping_settings()
        for e in expected:
            event = e["event"]
            if event["op"] == "READ":
                name = event["after"]["name"] if event["kind"] == "EXPERIMENT" else None
                urn = primary_urn_of_key(event["key"], name, settings)
                assert urn in mcp_keys, f"no MCP for {event['key']} ({urn})"
        assert experiment_urn("demo/training runs") in mcp_keys
    finally:
        connector.send_signal(signal.SIGTERM)
        try:
            connector.wait(60)
        except subprocess.TimeoutExpired:
            connector.kill()
            connector.wait(10)
    assert connector.returncode == 0, connector_log.read_text()[-3000:]

    # The example committed its offsets: the same group again reads nothing new ...
    again = subprocess.run(_example(kafka, topics.changes, group, "--exit-when-idle", "2"),
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout == "", again.stderr[-2000:]
    # A reader without the writer's schema version stops at the first record and commits nothing ...
    if NEWEST > 1:
        older = tmp_path / "older-schemas"
        older.mkdir()
        for version in range(1, NEWEST):
            (older / FILES[version].name).write_text(FILES[version].read_text())
        stopped = subprocess.run(_example(kafka, topics.changes, f"{group}-2", "--exit-when-idle", "2", schemas=older),
                                 capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert stopped.returncode == 2 and stopped.stdout == "", stopped.stderr[-2000:]
        assert f"is not in the schema directory (newest known: v{NEWEST - 1})" in stopped.stderr
    # ... so the same group, given every version, reads everything: one human-readable line per event.
    fresh = subprocess.run(_example(kafka, topics.changes, f"{group}-2", "--exit-when-idle", "2"),
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    lines = sorted(fresh.stdout.splitlines(), key=lambda s: tuple(map(int, s.split()[0].split(":"))))
    assert len(lines) == len(expected)
    for line, e in zip(lines, sorted(expected, key=lambda e: (e["partition"], e["offset"])), strict=True):
        event = e["event"]
        assert line.startswith(f"{e['partition']}:{e['offset']} {event['op']:<14} {event['kind']:<16} {e['key']} ")


def test_value_check_notices_a_changed_value() -> None:
    """The comparison behind `fastavro_problems` is not vacuous: an altered read value is reported."""
    writer = _raw(NEWEST)
    parsed, expanded = fastavro.parse_schema(writer), expand_schema(writer)
    record = next(r for r in samples(writer) if r["after"][0].endswith(".Run") and r["after"][1]["metrics"])
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, record)
    read = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), parsed, parsed)
    problems: list[str] = []
    _expect_same(record, read, expanded, expanded, "", problems)
    assert problems == []
    read["after"]["metrics"][0]["step"] += 1
    read["source"]["snapshot_id"] = "other"
    _expect_same(record, read, expanded, expanded, "", problems)
    assert [p.split(":")[0] for p in problems] == [".after.metrics[0].step", ".source.snapshot_id"]
