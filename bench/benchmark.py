"""Benchmark of issue 4: the connector against DataHub's batch MLflow source and the bulk-read floor.

One run builds (or takes from .cache/bench/) the scale fixture, starts its own `mlflow server` on a
free loopback port (access log followed, so every MLflow request is counted) and measures on it:

  (a) DataHub's MLflowSource (`datahub ingest`, file sink), full ingest, seconds;
  (b) the floor: every object read with bulk paged searches and nothing else, seconds;
  (c) `mlflow-datahub snapshot` with fresh topics, wall seconds, with its producer/consumer split;
  (d) freshness of `mlflow-datahub run`: MLflow write -> its MCP on the topic, p50/p95, for a
      registry change (webhooks when the connector has them, else polling) and for a new run;
  (e) MLflow requests per idle incremental cycle (compare x1 and x10: results are kept per scale);
  (f) consumer throughput on one core: our path (to_mcps + Decider + McpSerializer) against
      DataHub's DatahubKafkaEmitter serialisation of the same MCPs;
  (g) peak resident memory of `produce`, `consume` and `snapshot`;
  (s) start-up: the command's start -> its first MLflow request (a proxy stamps it);
  (r) restart: `run`'s start -> its first cycle, after 1 and after --history snapshots of history.

--latency-ms N puts a loopback proxy that delays each request by N ms in front of the server for (a),
(b) and (c) (MLflow across a network). At x100 (--scale 100) (a) is not run: it would take about an hour.

    .venv/bin/python bench/benchmark.py                 # x1, every part (make bench)
    .venv/bin/python bench/benchmark.py --scale 10      # x10 (builds a 20,000-run store once)
    .venv/bin/python bench/benchmark.py --quick --parts bcf   # small store, some parts

Kafka and the schema registry: KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL, else the local
stack (`connector.devstack.stack`, started if needed). Results: printed, and saved as JSON in .cache/bench/.

The parts are modules of their own (bench/part_*.py); the shared helpers are in bench/common.py
(Bench, Kafka endpoints, the machine) and bench/processes.py (child processes, their CPU and memory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import PRIVATE_STACK, Bench, kafka_endpoints, load_average, machine, say  # noqa: E402
from bench.part_consumer import part_f  # noqa: E402
from bench.part_floor import floor_read, part_b  # noqa: E402
from bench.part_freshness import part_d  # noqa: E402
from bench.part_idle import part_e  # noqa: E402
from bench.part_memory import part_g  # noqa: E402
from bench.part_original import part_a  # noqa: E402
from bench.part_restart import part_r  # noqa: E402
from bench.part_snapshot import part_c  # noqa: E402
from bench.part_startup import part_s  # noqa: E402
from bench.proxy import LatencyProxy  # noqa: E402
from bench.scale_fixture import CACHE, BenchServer, cached_store, shape  # noqa: E402
from bench.summary import summary  # noqa: E402

PARTS = "sbcrafegd"  # the order they run in: (d) writes to MLflow, so it comes last
ORIGINAL_MAX_SCALE = 10  # (a) beyond this would take about an hour (x100: 10 x its 6 minutes at x10)


# -- main -----------------------------------------------------------------------------------------


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=1, help="multiply experiments and models (default 1)")
    p.add_argument("--quick", action="store_true", help="a small store and fewer samples, to iterate")
    p.add_argument("--parts", default=PARTS, help=f"which parts, any of {PARTS} (default all)")
    p.add_argument("--poll-interval", type=float, default=5.0, help="connector poll interval for (d) (default 5)")
    p.add_argument("--idle-poll-interval", type=float, default=None, help="poll interval for (e) (default: as (d))")
    p.add_argument("--idle-cycles", type=int, default=None, help="idle cycles counted in (e) (default 10)")
    p.add_argument("--writes", type=int, default=None, help="writes per kind in (d) (default 50)")
    p.add_argument("--write-spacing", type=float, nargs=2, default=(0.3, 1.2), metavar=("MIN", "MAX"),
                   help="random pause between writes in (d), seconds (default 0.3 1.2)")
    p.add_argument("--webhooks", choices=["auto", "on", "off"], default="auto",
                   help="registry changes in (d) through webhooks: auto = when the connector has them")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds in (f) (each path: its best round)")
    p.add_argument("--repeat-floor", type=int, default=3, help="rounds of (b) (median)")
    p.add_argument("--repeat-snapshot", type=int, default=3, help="rounds of (c), each on fresh topics (median)")
    p.add_argument("--latency-ms", type=float, default=None, metavar="N",
                   help="(a), (b), (c) read MLflow through a loopback proxy that delays each request N ms "
                        "(default: directly, no proxy)")
    p.add_argument("--repeat-startup", type=int, default=3, help="rounds of (s) per command (median)")
    p.add_argument("--history", type=int, default=200, help="snapshots of history for (r) (default 200)")
    p.add_argument("--repeat-restart", type=int, default=2, help="restarts of (r) per history (median)")
    p.add_argument("--profile", action="store_true", help="(c): also profile a snapshot, each thread")
    p.add_argument("--mlflow-workers", type=int, default=1, help="workers of the bench's mlflow server")
    p.add_argument("--fixture-threads", type=int, default=8, help="threads creating the store through the API")
    p.add_argument("--fixture-method", choices=["clone", "api"], default="clone",
                   help="a store larger than x1: clone the x1 store in SQL (seconds, default) or create it "
                        "through the REST API (about 20 minutes for x10 on an idle 2-core machine)")
    p.add_argument("--timeout", type=float, default=None, help="per-step timeout, seconds")
    p.add_argument("--original-timeout", type=float, default=None, help="timeout of (a), seconds")
    p.add_argument("--private-stack", action="store_true",
                   help="Kafka and registry of the bench's own (.cache/bench/stack, ports 29092/28081), stopped "
                        "at the end; default: KAFKA_BOOTSTRAP_SERVERS/SCHEMA_REGISTRY_URL, else the local stack")
    p.add_argument("--keep", action="store_true", help="keep the work directory and the bench's topics")
    p.add_argument("--floor-only", metavar="URI", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.writes = args.writes or (10 if args.quick else 50)
    args.idle_cycles = args.idle_cycles or (3 if args.quick else 10)
    args.idle_poll_interval = args.idle_poll_interval or args.poll_interval
    args.timeout = args.timeout or 300.0 * args.scale
    args.original_timeout = args.original_timeout or 1200.0 * args.scale
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {''.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.floor_only:
        print(json.dumps(floor_read(args.floor_only)))
        return 0
    s = shape(args.scale, args.quick)
    info = machine()
    load_before = load_average()
    say(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']}, "
        f"load average {load_before}; code {info['commit']}")
    say(f"store {s.name}: {s.describe()}")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{s.name}-"))
    store = cached_store(s, workdir, progress=say, threads=args.fixture_threads, method=args.fixture_method)
    bootstrap, registry = kafka_endpoints(args.private_stack)
    server = BenchServer(workdir / "mlflow", store, workers=args.mlflow_workers)
    say(f"starting mlflow server ({args.mlflow_workers} worker) on a copy of the store ...")
    server.start()
    say(f"mlflow server {server.uri}; Kafka {bootstrap}; schema registry {registry}; work directory {workdir}")
    b = Bench(args, s, server, bootstrap, registry, workdir)
    if args.latency_ms is not None:
        b.proxy = b.stamp = LatencyProxy(server.uri, args.latency_ms, workdir / "proxy-requests.log")
        say(f"(a), (b), (c) read MLflow through a proxy that delays each request {args.latency_ms:g} ms: {b.uri}")
    started = time.time()
    steps = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f, "g": part_g,
             "s": part_s, "r": part_r}
    failed = []
    try:
        for part in PARTS:
            if part in args.parts:
                say()
                if part == "a" and args.scale > ORIGINAL_MAX_SCALE:
                    say(f"(a) DataHub's MLflowSource: not run at x{args.scale} (it would take about an hour: "
                        f"{args.scale // 10} x its time at x10); the ratio to it is given at x1 and x10")
                    continue
                try:
                    steps[part](b)
                except Exception as e:  # noqa: BLE001 - one failed part must not hide the others
                    failed.append(part)
                    say(f"    ({part}) FAILED: {type(e).__name__}: {e}")
    finally:
        for proxy in {id(p): p for p in (b.proxy, b.stamp) if p is not None}.values():
            proxy.stop()
        server.stop()
        if not args.keep:
            try:
                b.delete_topics()
            except Exception as e:  # noqa: BLE001
                say(f"could not delete the bench's topics: {e}")
            shutil.rmtree(workdir, ignore_errors=True)
        if args.private_stack and not args.keep:
            from connector.devstack import stack

            say("private stack stopped: " + ", ".join(stack.down(root=PRIVATE_STACK)))
    summary(b)
    load_after = load_average()
    say(f"load average before {load_before}, after {load_after}; {time.time() - started:.0f} s in all")
    out = CACHE / f"results-{s.name}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    merged = {**previous.get("results", {}), **b.results}
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info,
                               "load_average_before": load_before, "load_average_after": load_after,
                               "shape": s.describe(), "args": {k: v for k, v in vars(args).items()},
                               "results": merged}, indent=2, default=str))
    say(f"results: {out.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
