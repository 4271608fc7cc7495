"""An independent consumer of the MLflow change topic, in its own consumer group.

It needs nothing of the connector: only the schema files of `schemas/`, fastavro, and
confluent-kafka. Every record value is Avro single-object encoding:

    C3 01 | CRC-64-AVRO fingerprint of the writer schema (8 bytes, little-endian) | Avro binary

The fingerprint names the writer schema among `schemas/ChangeEvent.v*.avsc`; the record is read with
Avro schema resolution into the newest schema, so events of every version look alike.

    python examples/independent_consumer.py --bootstrap 127.0.0.1:19092 --group my-team
    python examples/independent_consumer.py --json --exit-when-idle 10   # one JSON object a line

One line per event on stdout; status and problems on stderr. Offsets are committed only for events
already printed (at least once). A record written with a schema version this reader does not have
stops it without committing past that record: add the new `ChangeEvent.vN.avsc` and start again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER = 10
DEFAULT_SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


class UnknownWriterSchema(Exception):
    """The record was written with a schema version that is not in the schema directory."""


class Decoder:
    """Single-object decoding with the ChangeEvent schemas of one directory."""

    def __init__(self, schema_dir: Path) -> None:
        versions: dict[int, dict[str, Any]] = {}
        for path in schema_dir.glob("ChangeEvent.v*.avsc"):
            number = int(path.name.split(".")[1].removeprefix("v"))
            versions[number] = fastavro.parse_schema(json.loads(path.read_text()))
        if not versions:
            raise SystemExit(f"no ChangeEvent.v*.avsc in {schema_dir}")
        self.version = max(versions)
        self.reader = versions[self.version]
        self.writers: dict[bytes, dict[str, Any]] = {}
        for schema in versions.values():
            # fastavro's hex string already lists the 8 bytes in the header's (little-endian) order.
            self.writers[bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))] = schema

    def decode(self, value: bytes) -> dict[str, Any]:
        if len(value) < HEADER or value[:2] != MAGIC:
            raise ValueError("not Avro single-object encoding (no C3 01 header)")
        writer = self.writers.get(value[2:HEADER])
        if writer is None:
            raise UnknownWriterSchema(f"writer schema fingerprint {value[2:HEADER].hex()} is not in the "
                                      f"schema directory (newest known: v{self.version})")
        return fastavro.schemaless_reader(io.BytesIO(value[HEADER:]), writer, self.reader)  # type: ignore[return-value]


def summary(event: dict[str, Any]) -> str:
    """A few telling fields of the entity (the full state is in `after`)."""
    after = event["after"]
    if after is None:
        return "(gone from MLflow)"
    kind = event["kind"]
    if kind == "EXPERIMENT":
        return f"name={after['name']!r} lifecycle_stage={after['lifecycle_stage']}"
    if kind == "RUN":
        return (f"experiment={after['experiment_name']!r} status={after['status']} params={len(after['params'])} "
                f"metrics={len(after['metrics'])} model_versions={len(after['model_versions'])}")
    if kind == "REGISTERED_MODEL":
        return f"versions={[v['version'] for v in after['latest_versions']]} aliases={len(after['aliases'])}"
    if kind == "MODEL_VERSION":
        run = after["run"]["run_id"] if after["run"] else None
        return f"stage={after['current_stage']} status={after['status']} run={run}"
    if kind == "LOGGED_MODEL":
        return f"name={after['name']!r} source_run={after['source_run_id']} status={after['status']}"
    if kind == "SNAPSHOT":
        return (f"snapshot={after['snapshot_id']} complete={after['complete']} entities={after['entities']} "
                f"partitions={after['partitions']}")
    return ""


def line(msg: Message, event: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps({"partition": msg.partition(), "offset": msg.offset(),
                           "key": msg.key().decode() if msg.key() is not None else None, "event": event},
                          sort_keys=True)
    return (f"{msg.partition()}:{msg.offset()} {event['op']:<14} {event['kind']:<16} {event['key']} "
            f"{summary(event)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
                   help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS or %(default)s)")
    p.add_argument("--topic", default="mlflow.changes", help="change topic (default: %(default)s)")
    p.add_argument("--group", default="mlflow-changes-example",
                   help="consumer group; a new group starts at the beginning of the topic (default: %(default)s)")
    p.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS,
                   help="directory with ChangeEvent.v*.avsc (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print each event as one JSON object")
    p.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                   help="exit once every assigned partition is read to its end and nothing new came for SECONDS")
    p.add_argument("--config", action="append", default=[], metavar="NAME=VALUE",
                   help="extra librdkafka setting, e.g. security.protocol=SSL (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    decoder = Decoder(args.schemas)
    extra = dict(item.split("=", 1) for item in args.config)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",      # a new group reads the topic from its beginning
        "isolation.level": "read_committed",  # the producer writes in transactions
        "enable.auto.commit": True,           # commits offsets stored below, i.e. of printed events only
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,         # tells when a partition is read to its end
        **extra,
    })
    at_end: dict[int, bool] = {}  # assigned partition -> read to its end
    last_activity = time.monotonic()  # last record, end of partition or assignment

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        nonlocal last_activity
        at_end.update({p.partition: False for p in partitions})
        last_activity = time.monotonic()
        print(f"assigned {args.topic} partitions {sorted(p.partition for p in partitions)}", file=sys.stderr)

    def on_revoke(c: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            at_end.pop(p.partition, None)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    consumer.subscribe([args.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
    print(f"reading {args.topic} as group {args.group} with schemas v1..v{decoder.version} of {args.schemas}",
          file=sys.stderr)
    events = skipped = 0
    status = 0
    try:
        while not stopping:
            msg = consumer.poll(0.5)
            if msg is None:
                idle = time.monotonic() - last_activity
                if (args.exit_when_idle is not None and at_end and all(at_end.values())
                        and idle >= args.exit_when_idle):
                    break
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end[msg.partition()] = True
                    last_activity = time.monotonic()
                elif error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    print(f"waiting for topic {args.topic}: {error.str()}", file=sys.stderr)
                elif error.fatal():
                    raise KafkaException(error)
                else:
                    print(f"kafka: {error.str()}", file=sys.stderr)
                continue
            last_activity = time.monotonic()
            at_end[msg.partition()] = False
            where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            value = msg.value()
            try:
                if value is None:
                    raise ValueError("null value (tombstone)")
                event = decoder.decode(value)
            except UnknownWriterSchema as e:
                print(f"stopping at {where}: {e}; add its schema to {args.schemas} and start again", file=sys.stderr)
                status = 2
                break
            except Exception as e:  # fastavro raises several types for a corrupt body
                print(f"skipping {where}: {e}", file=sys.stderr)
                skipped += 1
                consumer.store_offsets(msg)
                continue
            print(line(msg, event, args.json), flush=True)
            events += 1
            consumer.store_offsets(msg)
    finally:
        consumer.close()  # commits the stored offsets
    print(f"{events} events read, {skipped} records skipped", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
