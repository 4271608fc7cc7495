"""(r) Restart: from starting `run` until its producer's first cycle begins (the log line the run loop
writes before its first cycle; the cycle's first MLflow request, stamped by a proxy, beside it), after
one snapshot of history and after `--history` snapshots.

History: one real snapshot, written and consumed by `run` itself; then `--history - 1` more written the
way a snapshot writes them, without reading MLflow again: in each, a SNAPSHOT_BEGIN marker on every
partition (connector.contract.envelope.snapshot_marker, encoded with connector.contract.codec), the
first snapshot's entity records again (its Avro bytes, keys and partitions), SNAPSHOT_END markers
(complete, with the entity count), and in the producer-offsets topic the producer's position as a
snapshot writes it at its begin and at its end. An unchanged entity's summary is not written again (as
`_summary_write` does not). The consumer group's offsets are then committed at the change topic's end,
as after consuming all of it: the consumer's state topic is what it was after the first snapshot, as it
is after identical snapshots. (The real producer writes a snapshot in many transactions, one per page;
here each snapshot is one transaction: its records and their sizes are the same.)"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import replace
from typing import Any

from bench.common import Bench, say, wait_snapshot_consumed
from bench.processes import Child, connector_cli, log_time, tail

TARGET_SECONDS = 5.0
READY = r"producer reading \S+ every"


def restart_once(b: Bench, path: Any, logs: str) -> dict[str, Any]:
    assert b.stamp is not None
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-restart"), b.workdir / logs)
    deadline = time.monotonic() + b.args.timeout
    ready = None
    try:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"run exited early:\n{tail(child.stderr())}")
            ready = log_time(child.stderr(), READY)
            if ready is not None:
                break
            time.sleep(0.02)
        if ready is None:
            raise TimeoutError(f"run not ready in {b.args.timeout:.0f} s:\n{tail(child.stderr())}")
        cycle = None
        while cycle is None and time.monotonic() < deadline:
            cycle = b.stamp.first(ready - 0.002)
            time.sleep(0.02)
    finally:
        fin = child.stop(60)
    restored = re.search(r"producer position restored: snapshot (\d+), (\d+) entities published \((\d+) records "
                         r"read in ([\d.]+) s\)", fin.stderr)
    return {"ready_seconds": ready - child.started,
            "first_cycle_request_seconds": None if cycle is None else cycle - child.started,
            "first_request_seconds": (lambda t: None if t is None else t - child.started)(b.stamp.first(child.started)),
            "restored": restored.groups() if restored else None}


def add_history(b: Bench, data: dict[str, Any], snapshots: int) -> dict[str, Any]:
    """`snapshots` more snapshots' worth of records after the first one (see the module)."""
    from confluent_kafka import TopicPartition

    from connector.config import parse
    from connector.contract import codec
    from connector.contract.envelope import snapshot_marker, source_block
    from connector.contract.events import SNAPSHOT_MARKER_KEY
    from connector.kafka.reading import read_committed, watermarks
    from connector.pipeline.position import Position, position_key

    cfg = parse(data)
    topics = cfg.kafka.topics
    marker_key = SNAPSHOT_MARKER_KEY.encode()
    records = [(msg.partition(), msg.key(), msg.value())
               for msg in read_committed(b.connection, topics.changes, role="bench history")
               if msg.key() != marker_key]
    pkey = position_key(cfg)
    position = None
    for msg in read_committed(b.connection, topics.producer_offsets, role="bench history"):
        if msg.key() == pkey and msg.value() is not None:
            position = Position.from_json(msg.value())
    assert position is not None and position.partitions
    partitions = position.partitions
    uri = data["source"]["config"]["tracking_uri"]
    producer = b.connection.producer("bench history", {
        "transactional.id": f"{cfg.kafka.transactional_id_prefix}-bench-history", "linger.ms": 50,
        "message.max.bytes": 8 * 1024 * 1024, "queue.buffering.max.messages": 1_000_000})
    producer.init_transactions(60)

    def produce(topic: str, key: bytes, value: bytes | None, **kwargs: Any) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value, **kwargs)
                return
            except BufferError:
                producer.poll(0.2)

    started = time.monotonic()
    first_seq = position.snapshot_seq
    base_ms = int(time.time() * 1000) - snapshots * 1000
    for i in range(1, snapshots + 1):
        seq = first_seq + i
        at = base_ms + i * 1000
        sid = f"{seq}-{at}"
        producer.begin_transaction()
        for p in range(partitions):
            produce(topics.changes, marker_key, codec.encode(snapshot_marker(
                "SNAPSHOT_BEGIN", sid, partitions, source_block(uri, uri, at, sid), at)), partition=p)
        produce(topics.producer_offsets, pkey, replace(position, snapshot_seq=seq, running_snapshot=sid).to_json())
        for p, key, value in records:
            produce(topics.changes, key, value, partition=p)
        for p in range(partitions):
            produce(topics.changes, marker_key, codec.encode(snapshot_marker(
                "SNAPSHOT_END", sid, partitions, source_block(uri, uri, at + 900, sid), at + 900, True,
                len(records))), partition=p)
        position = replace(position, snapshot_seq=seq, last_snapshot_ms=at, running_snapshot=None,
                           last_snapshot={**(position.last_snapshot or {}), "id": sid, "ended_ms": at + 900})
        produce(topics.producer_offsets, pkey, position.to_json())
        producer.commit_transaction(120)
    producer.flush(60)
    # The consumer group has consumed everything (it would have, with nothing to change in DataHub).
    reader = b.connection.reader("bench history", cfg.kafka.consumer_group)
    try:
        deadline = time.monotonic() + 30
        ends = [TopicPartition(topics.changes, p, watermarks(reader, TopicPartition(topics.changes, p), deadline)[1])
                for p in range(partitions)]
        reader.commit(offsets=ends, asynchronous=False)
    finally:
        reader.close()
    return {"snapshots_added": snapshots, "records_per_snapshot": len(records),
            "bytes_per_snapshot": sum(len(v or b"") + len(k or b"") for _, k, v in records),
            "change_topic_records": sum(tp.offset for tp in ends), "write_seconds": time.monotonic() - started}


def part_r(b: Bench) -> None:
    uri = b.stamped_uri()
    history = b.args.history
    rounds = max(1, b.args.repeat_restart)
    say(f"(r) restart: `run` start -> its first cycle begins, after 1 and after {history} snapshots of history "
        f"({rounds} rounds each)")
    path, data = b.config("restart", uri=uri)
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-restart"), b.workdir / "restart-first")
    try:
        wait_snapshot_consumed(b.connection, child, data, b.args.timeout)
    finally:
        child.stop(120)
    after_one = [restart_once(b, path, f"restart-1-{i}") for i in range(rounds)]
    added = add_history(b, data, history - 1)
    say(f"    history: {added['snapshots_added']} snapshots added ({added['records_per_snapshot']} records, "
        f"{added['bytes_per_snapshot'] / 1e6:.1f} MB each; change topic now {added['change_topic_records']} "
        f"records) in {added['write_seconds']:.0f} s")
    after_many = [restart_once(b, path, f"restart-{history}-{i}") for i in range(rounds)]
    figures = {"scale": b.shape.name, "history": history, "added": added, "after_1": after_one,
               f"after_{history}": after_many,
               "ready_after_1_median": statistics.median(r["ready_seconds"] for r in after_one),
               "ready_after_history_median": statistics.median(r["ready_seconds"] for r in after_many)}
    b.record("r", figures)
    for label, rs in (("1 snapshot", after_one), (f"{history} snapshots", after_many)):
        say(f"    after {label}: first cycle begins " + ", ".join(f"{r['ready_seconds']:.2f}" for r in rs)
            + " s (first request " + ", ".join("?" if r["first_request_seconds"] is None else
                                               f"{r['first_request_seconds']:.2f}" for r in rs)
            + f" s); restore: {rs[0]['restored']} (snapshot, entities, records, seconds)")
