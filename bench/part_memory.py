"""(g) Peak resident memory of `produce` and `consume`, each run alone over a complete snapshot
(those of `snapshot` and `run`, both in one command, come from (c) and (e))."""

from __future__ import annotations

import time

from bench.common import Bench, caught_up, say
from bench.processes import Child, connector_cli, log_time, tail


def part_g(b: Bench) -> None:
    say("(g) peak resident memory: `produce` and `consume` run separately over a complete snapshot")
    path, data = b.config("memory", poll=3600, uri=b.server.uri)
    k = data["kafka"]
    producer = Child(connector_cli("produce", "-c", path), b.workdir / "produce")
    deadline = time.monotonic() + b.args.timeout
    while log_time(producer.stderr(), r"snapshot \S+ complete") is None:
        if not producer.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"produce did not complete its snapshot:\n{tail(producer.stderr())}")
        time.sleep(0.2)
    produced = producer.stop()
    consumer = Child(connector_cli("consume", "-c", path, "--instance-id", "bench-memory"), b.workdir / "consume")
    deadline = time.monotonic() + b.args.timeout
    while not caught_up(b.connection, k["topics"]["changes"], k["consumer_group"]):
        if not consumer.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"consume did not catch up:\n{tail(consumer.stderr())}")
        time.sleep(0.5)
    consumed = consumer.stop()
    figures = {"scale": b.shape.name, "produce_mb": produced.maxrss_mb, "consume_mb": consumed.maxrss_mb,
               "snapshot_mb": b.results.get("c", {}).get("maxrss_mb"),
               "run_mb": b.results.get("e", {}).get("run_maxrss_mb")}
    b.record("g", figures)
    say(f"    produce {produced.maxrss_mb:.0f} MB, consume {consumed.maxrss_mb:.0f} MB"
        + (f", snapshot (both, part c) {figures['snapshot_mb']:.0f} MB" if figures["snapshot_mb"] else "")
        + (f", run (both, part e) {figures['run_mb']:.0f} MB" if figures["run_mb"] else "")
        + f" at {b.shape.name}")
