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
  (g) peak resident memory of `produce`, `consume` and `snapshot`.

    .venv/bin/python bench/benchmark.py                 # x1, every part (make bench)
    .venv/bin/python bench/benchmark.py --scale 10      # x10 (builds a 20,000-run store once)
    .venv/bin/python bench/benchmark.py --quick --parts bcf   # small store, some parts

Kafka and the schema registry: KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL, else the local
stack (`connector.stack`, started if needed). Results: printed, and saved as JSON in .cache/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.scale_fixture import (  # noqa: E402
    CACHE,
    EXPERIMENT_PREFIX,
    MODEL_PREFIX,
    BenchServer,
    Shape,
    cached_store,
    shape,
)
from connector.devstack.mlflow_server import free_port  # noqa: E402

ORIGINAL_VENV = Path(os.environ.get("DATAHUB_ORIGINAL_VENV") or REPO / ".cache" / "original-venv")
PARTS = "bcafegd"  # the order they run in: (d) writes to MLflow, so it comes last


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "connector", "schemas"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit += " (connector/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {"commit": commit,
        "nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "memory_gb": round(mem_gb, 1),
        "cpu_model": cpu, "python": platform.python_version(), "kernel": platform.release(),
        "mlflow": version("mlflow"), "acryl_datahub": version("acryl-datahub"),
        "confluent_kafka": version("confluent-kafka"),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- child processes ------------------------------------------------------------------------------


@dataclass
class Finished:
    rc: int
    wall: float
    maxrss_mb: float
    cpu_seconds: float
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _process_tree(pid: int) -> list[int]:
    """A process and every process under it (those still there)."""
    tree, pending = [], [pid]
    while pending:
        p = pending.pop()
        tree.append(p)
        pending += _children(p)
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and every process under it."""
    return sum(_cpu_seconds(p) for p in _process_tree(pid))


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Child:
    """A subprocess: its end is reaped with wait4 (for its CPU time, its own processes' included) and
    its peak resident memory is VmHWM from /proc/<pid>/status, sampled every 50 ms while it runs, for
    it and each process it starts (`snapshot` forks its consumers): the figure is the sum of their
    peaks. (wait4's ru_maxrss cannot be used: Linux carries the parent's RSS at fork over into the
    child's.)"""

    def __init__(self, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self._out = open(logs.with_suffix(".out"), "w+")
        self._err = open(logs.with_suffix(".err"), "w+")
        self.started = time.time()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self._out, stderr=self._err, cwd=REPO,
                                     env=env or {**os.environ})
        self.finished: Finished | None = None
        self.peaks: dict[int, float] = {}  # pid -> VmHWM, MB, for the process and its descendants
        self._sampler = threading.Thread(target=self._sample, name="vmhwm", daemon=True)
        self._sampler.start()

    @property
    def peak_mb(self) -> float:
        return sum(self.peaks.values())

    def _sample_tree(self) -> None:
        for pid in _process_tree(self.proc.pid):
            hwm = _vm_hwm_mb(pid)
            if hwm is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)

    def _sample(self) -> None:
        while self.finished is None:
            self._sample_tree()
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.logs.with_suffix(".err").read_text(errors="replace")

    def alive(self) -> bool:
        return self.finished is None and self._reap(block=False) is None

    def vm_hwm_mb(self) -> float | None:
        return _vm_hwm_mb(self.proc.pid)

    def _reap(self, block: bool) -> Finished | None:
        if self.finished is not None:
            return self.finished
        self._sample_tree()  # the last reading while it is still there (a zombie has none)
        pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        wall = time.monotonic() - self._t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._out.close()
        self._err.close()
        self.finished = Finished(
            rc=self.proc.returncode, wall=wall, maxrss_mb=self.peak_mb,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            stdout=self.logs.with_suffix(".out").read_text(errors="replace"), stderr=self.stderr(),
        )
        return self.finished

    def wait(self, timeout: float) -> Finished:
        deadline = time.monotonic() + timeout
        while True:
            done = self._reap(block=False)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                self.proc.kill()
                done = self._reap(block=True)
                assert done is not None
                raise TimeoutError(f"{self.proc.args[:4]} still running after {timeout:.0f} s; killed "
                                   f"(logs: {self.logs}.*)")
            time.sleep(0.01)

    def stop(self, timeout: float = 60) -> Finished:
        if self.finished is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def connector_cli(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "connector.cli", *args]


LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) ")


def log_time(text: str, pattern: str) -> float | None:
    """Epoch seconds of the first log line (the CLI's asctime format) matching `pattern`."""
    rx = re.compile(pattern)
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and rx.search(line):
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    return None


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- the bench ------------------------------------------------------------------------------------


PRIVATE_STACK = CACHE / "stack"
PRIVATE_PORTS = ("MLFLOW_DATAHUB_KAFKA_PORT", "MLFLOW_DATAHUB_CONTROLLER_PORT", "MLFLOW_DATAHUB_REGISTRY_PORT",
                 "MLFLOW_DATAHUB_MLFLOW_PORT")


def kafka_endpoints(private: bool) -> tuple[str, str]:
    """The environment's Kafka and registry, else the local stack; `private`: a stack of the bench's
    own in .cache/bench/stack on other ports (Kafka restarts by concurrent test runs cannot reach it)."""
    from connector.devstack import stack

    if private:
        if not any(s.running for s in stack.status(root=PRIVATE_STACK)):
            # A fresh stack on free ports each time (its Kafka log is formatted for its ports).
            shutil.rmtree(PRIVATE_STACK, ignore_errors=True)
            ports: set[int] = set()
            while len(ports) < len(PRIVATE_PORTS):
                ports.add(free_port())
            os.environ.update({var: str(port) for var, port in zip(PRIVATE_PORTS, sorted(ports), strict=True)})
        endpoints = stack.up(root=PRIVATE_STACK, progress=lambda m: None if "not on the configured" in m else say(m))
        return endpoints.kafka_bootstrap_servers, endpoints.schema_registry_url
    bootstrap, registry = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("SCHEMA_REGISTRY_URL")
    if bootstrap and registry:
        return bootstrap, registry
    endpoints = stack.up(progress=say)
    return endpoints.kafka_bootstrap_servers, endpoints.schema_registry_url


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def endpoint_counts(requests: list[tuple[float, str]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for _, line in requests:
        m = re.search(r'"(GET|POST|PATCH|DELETE|PUT) ([^ ?"]+)', line)
        if m:
            path = m.group(2).removeprefix("/api/2.0/mlflow/").removeprefix("/ajax-api/2.0/mlflow/")
            counts[f"{m.group(1)} {path}"] += 1
    return dict(counts.most_common())


@dataclass
class Bench:
    args: argparse.Namespace
    shape: Shape
    server: BenchServer
    bootstrap: str
    registry: str
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.server.uri

    def server_cpu_seconds(self) -> float:
        """CPU time the MLflow server's processes have used so far."""
        return tree_cpu_seconds(self.server.process.pid)  # type: ignore[union-attr]

    def requests(self, start: float, end: float) -> list[tuple[float, str]]:
        assert self.server.access is not None
        return self.server.access.between(start, end)

    def config(self, name: str, poll: float | None = None, extra: dict[str, Any] | None = None
               ) -> tuple[Path, dict[str, Any]]:
        """A connector configuration with topics, group and transactional ids of its own."""
        prefix = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self.prefixes.append(prefix)
        data: dict[str, Any] = {
            "source": {"type": "mlflow", "config": {"tracking_uri": self.uri,
                                                    "stateful_ingestion": {"enabled": True}}},
            "kafka": {
                "bootstrap_servers": self.bootstrap, "schema_registry_url": self.registry, "partitions": 3,
                "consumer_group": f"{prefix}-group", "transactional_id_prefix": prefix,
                "topics": {"changes": f"{prefix}.changes", "state": f"{prefix}.state",
                           "producer_offsets": f"{prefix}.producer-offsets", "dead_letter": f"{prefix}.dlq",
                           "mcp": f"{prefix}.mcp"},
            },
            "producer": {"poll_interval_seconds": poll or self.args.poll_interval,
                         "reconcile_interval_seconds": 86400},
        }
        for key, value in (extra or {}).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) \
                else value
        path = self.workdir / f"{name}.yml"
        path.write_text(yaml.safe_dump(data))
        return path, data

    def record(self, part: str, figures: dict[str, Any]) -> None:
        self.results[part] = {**figures, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load_average()}

    def delete_topics(self) -> None:
        from confluent_kafka.admin import AdminClient

        client = AdminClient({"bootstrap.servers": self.bootstrap})
        topics = [t for t in client.list_topics(timeout=10).topics if t.startswith(tuple(self.prefixes))]
        if topics:
            for future in client.delete_topics(topics, operation_timeout=30).values():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - best effort
                    pass


def caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """Has `group` committed the whole of `topic`? (Each partition ends with a transaction marker.)"""
    from confluent_kafka import Consumer, KafkaException

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 0})
    try:
        return _caught_up(c, topic)
    except KafkaException:  # the broker is restarting: not yet
        return False
    finally:
        c.close()


def _caught_up(c: Any, topic: str) -> bool:
    from confluent_kafka import TopicPartition

    meta = c.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or not meta.partitions:
        return False
    committed = c.committed([TopicPartition(topic, p) for p in meta.partitions], timeout=10)
    for tp in committed:
        _, high = c.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
        if high > 0 and tp.offset < high - 1:
            return False
    return True


def wait_snapshot_consumed(child: Child, data: dict[str, Any], timeout: float) -> float:
    """Wait until the child's first snapshot is published and consumed; returns when (epoch)."""
    deadline = time.monotonic() + timeout
    k = data["kafka"]
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.proc.args[3]} exited early:\n{tail(child.stderr())}")
        if log_time(child.stderr(), r"snapshot \S+ complete") is not None and \
                caught_up(k["bootstrap_servers"], k["consumer_group"], k["topics"]["changes"]):
            return time.time()
        time.sleep(0.5)
    raise TimeoutError(f"first snapshot not consumed in {timeout:.0f} s:\n{tail(child.stderr())}")


# -- (b) the floor --------------------------------------------------------------------------------


def floor_read(uri: str) -> dict[str, Any]:
    """Every experiment, run, registered model and model version, with bulk paged searches only."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri, registry_uri=uri)
    started = time.perf_counter()

    def pages(search: Callable[..., Any], **kwargs: Any) -> list[Any]:
        out: list[Any] = []
        token = None
        while True:
            page = search(page_token=token, **kwargs)
            out.extend(page)
            token = page.token
            if not token:
                return out

    split: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        split[name] = now - since
        return now

    experiments = pages(client.search_experiments, view_type=ViewType.ALL, max_results=50000)
    t = lap("experiments", started)
    ids = [e.experiment_id for e in experiments]
    runs = 0
    for start in range(0, len(ids), 100):
        runs += len(pages(client.search_runs, experiment_ids=ids[start:start + 100], run_view_type=ViewType.ALL,
                          max_results=50000))
    t = lap("runs", t)
    models = pages(client.search_registered_models, max_results=1000)
    t = lap("registered_models", t)
    versions = pages(client.search_model_versions, max_results=200000)
    lap("model_versions", t)
    return {"seconds": time.perf_counter() - started, "experiments": len(experiments), "runs": runs,
            "registered_models": len(models), "model_versions": len(versions), "split": split}


def part_b(b: Bench) -> None:
    say("(b) floor: bulk paged searches only (MlflowClient, max_results at MLflow's caps)")
    floor_read(b.uri)  # warm-up: the server's first read of the store pays for the OS page cache
    b.server.access.settle()  # type: ignore[union-attr]
    rounds = []
    for _ in range(b.args.repeat_floor):
        t0, cpu0 = time.time(), b.server_cpu_seconds()
        r = floor_read(b.uri)
        b.server.access.settle()  # type: ignore[union-attr]
        r["server_cpu_seconds"] = b.server_cpu_seconds() - cpu0
        r["requests"] = len(b.requests(t0, time.time()))
        rounds.append(r)
    seconds = statistics.median(r["seconds"] for r in rounds)
    # What MLflow's server spends answering the floor's searches: its one worker serves them in
    # Python, one core at a time, so no client can read everything faster than this.
    server_cpu = statistics.median(r["server_cpu_seconds"] for r in rounds)
    counts = {k: rounds[0][k] for k in ("experiments", "runs", "registered_models", "model_versions")}
    # The connector's own listing (its page sizes, joins and entity states), no Kafka: how much of
    # the producer's time is MLflow reading as the connector does it.
    from connector.config import parse
    from connector.mlflow.listing import full_listing
    from connector.mlflow.reader import MlflowReader

    cfg = parse(yaml.safe_load(b.config("listing")[0].read_text()))
    reader = MlflowReader(cfg.reader_settings())
    t0, w0 = time.time(), time.perf_counter()
    entities = sum(1 for _ in full_listing(reader))
    listing = time.perf_counter() - w0
    b.server.access.settle()  # type: ignore[union-attr]
    listing_requests = len(b.requests(t0, time.time()))
    # The same read as a fresh process: Python start-up and importing MLflow included, as for (c).
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, __file__, "--floor-only", b.uri], capture_output=True, text=True,
                         cwd=REPO, check=True)
    process_wall = time.monotonic() - t0
    inner = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    best = min(rounds, key=lambda r: r["seconds"])
    b.record("b", {"seconds": seconds, "rounds": [r["seconds"] for r in rounds], "requests": rounds[0]["requests"],
                   "split_of_fastest": best["split"],
                   "objects": counts, "process_wall_seconds": process_wall, "process_read_seconds": inner,
                   "connector_listing_seconds": listing, "connector_listing_requests": listing_requests,
                   "connector_listing_entities": entities, "server_cpu_seconds": server_cpu})
    each = ", ".join(f"{r['seconds']:.2f}" for r in rounds)
    say(f"    {seconds:.2f} s (median of {len(rounds)}: {each}), "
        f"{rounds[0]['requests']} MLflow requests, objects {counts}")
    say(f"    MLflow's server: {server_cpu:.2f} s of CPU to answer them (median)")
    say("    fastest round by listing: " + ", ".join(f"{k} {v:.2f} s" for k, v in best["split"].items()))
    say(f"    the connector's own listing (connector.listing.full_listing, page size {cfg.producer.page_size}, "
        f"no Kafka): {listing:.2f} s, {listing_requests} requests, {entities} entities")
    say(f"    as a fresh process (python start + imports + read): {process_wall:.2f} s wall, read {inner:.2f} s")


# -- (c) the snapshot -----------------------------------------------------------------------------


def part_c(b: Bench) -> None:
    say("(c) connector: `mlflow-datahub snapshot` with fresh topics, until the last MCP is acknowledged")
    # Each round on topics of its own, like a first snapshot; the median round is reported (as (b)).
    rounds: list[tuple[Child, Finished, float]] = []
    for i in range(b.args.repeat_snapshot):
        path, data = b.config(f"snapshot-{i + 1}")
        cpu0 = b.server_cpu_seconds()
        child = Child(connector_cli("snapshot", "-c", path), b.workdir / f"snapshot-{i + 1}")
        fin = child.wait(b.args.timeout)
        b.server.access.settle()  # type: ignore[union-attr]
        server_cpu = b.server_cpu_seconds() - cpu0
        if fin.rc != 0:
            raise RuntimeError(f"snapshot failed ({fin.rc}):\n{tail(fin.stderr)}\n{tail(fin.stdout)}")
        rounds.append((child, fin, server_cpu))
    walls = [fin.wall for _, fin, _ in rounds]
    child, fin, server_cpu = sorted(rounds, key=lambda r: r[1].wall)[len(rounds) // 2]
    end = child.started + fin.wall
    requests = b.requests(child.started, end + 0.5)
    mcps = int(re.search(r"MCPs acknowledged on \S+: (\d+)", fin.stdout).group(1))  # type: ignore[union-attr]
    events = int(re.search(r"events: (\d+)", fin.stdout).group(1))  # type: ignore[union-attr]
    own = float(re.search(r"seconds: ([\d.]+)", fin.stdout).group(1))  # type: ignore[union-attr]
    begun = log_time(fin.stderr, r"snapshot \S+ started")
    published = log_time(fin.stderr, r"snapshot \S+ (complete|INCOMPLETE)")
    split: dict[str, float] = {}
    if begun and published:
        split = {"startup": begun - child.started, "producer": published - begun, "consumer": end - published}
    # Python start-up and imports alone, for scale.
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import connector.cli, connector.producer, connector.consumer"],
                   cwd=REPO, check=True)
    imports = time.monotonic() - t0
    figures = {"seconds": fin.wall, "rounds_seconds": walls, "own_seconds": own, "split": split, "mcps": mcps,
               "events": events,
               "requests": len(requests), "request_endpoints": endpoint_counts(requests),
               "maxrss_mb": fin.maxrss_mb, "cpu_seconds": fin.cpu_seconds, "server_cpu_seconds": server_cpu,
               "python_imports_seconds": imports}
    b.record("c", figures)
    say(f"    {fin.wall:.2f} s wall (median of {len(walls)}: {', '.join(f'{w:.2f}' for w in walls)}; "
        f"{own:.1f} s by its own clock), {events} change events -> {mcps} MCPs, "
        f"{len(requests)} MLflow requests, CPU {fin.cpu_seconds:.1f} s (MLflow's server meanwhile "
        f"{server_cpu:.1f} s), peak RSS {fin.maxrss_mb:.0f} MB")
    if split:
        say(f"    split: start-up (python, imports, topics, transactions, restore) {split['startup']:.2f} s, "
            f"producer (MLflow -> change topic) {split['producer']:.2f} s, "
            f"consumer (change topic -> MCP topic, acknowledged) {split['consumer']:.2f} s")
    say(f"    (python start + importing the connector alone: {imports:.2f} s)")
    if b.args.profile:
        profile_snapshot(b)


def profile_snapshot(b: Bench) -> None:
    import pstats

    path, _ = b.config("snapshot-profile")
    out = b.workdir / "snapshot.prof"
    child = Child([sys.executable, "-m", "cProfile", "-o", out, "-m", "connector.cli", "snapshot", "-c", path],
                  b.workdir / "snapshot-profile")
    fin = child.wait(b.args.timeout * 3)
    if fin.rc != 0:
        raise RuntimeError(f"profiled snapshot failed:\n{tail(fin.stderr)}")
    say(f"    cProfile of a second snapshot (main thread; {fin.wall:.1f} s under the profiler): {out}")
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)


# -- (a) DataHub's original ------------------------------------------------------------------------


def part_a(b: Bench) -> None:
    say("(a) DataHub's MLflowSource: `datahub ingest`, file sink, full ingest")
    cli = ORIGINAL_VENV / "bin" / "datahub"
    if not cli.exists():
        say(f"    skipped: {cli} is missing (make bench creates it)")
        return
    out = b.workdir / "original.json"
    recipe = b.workdir / "original-recipe.yml"
    recipe.write_text(yaml.safe_dump({"source": {"type": "mlflow", "config": {"tracking_uri": b.uri}},
                                      "sink": {"type": "file", "config": {"filename": str(out)}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATAHUB_", "VIRTUAL_ENV"))}
    env["DATAHUB_TELEMETRY_ENABLED"] = "false"
    env["PATH"] = f"{cli.parent}{os.pathsep}{env.get('PATH', '')}"
    child = Child([cli, "ingest", "-c", recipe], b.workdir / "original", env=env)
    fin = child.wait(b.args.original_timeout)
    b.server.access.settle()  # type: ignore[union-attr]
    if fin.rc != 0 or not out.exists():
        raise RuntimeError(f"datahub ingest failed ({fin.rc}):\n{tail(fin.stderr)}\n{tail(fin.stdout)}")
    requests = b.requests(child.started, child.started + fin.wall + 0.5)
    mcps = len(json.loads(out.read_text()))
    endpoints = endpoint_counts(requests)
    b.record("a", {"seconds": fin.wall, "mcps": mcps, "requests": len(requests), "request_endpoints": endpoints,
                   "maxrss_mb": fin.maxrss_mb, "cpu_seconds": fin.cpu_seconds})
    say(f"    {fin.wall:.1f} s, {mcps} MCPs, {len(requests)} MLflow requests "
        f"({', '.join(f'{n} {e}' for e, n in list(endpoints.items())[:5])}), CPU {fin.cpu_seconds:.1f} s, "
        f"peak RSS {fin.maxrss_mb:.0f} MB")


# -- (f) consumer throughput ----------------------------------------------------------------------


class FastMcpWriter:
    """Prototype for (f): DataHub's MCP wire format with one avrogen conversion per aspect."""

    def __init__(self, schema_id: bytes) -> None:
        import fastavro
        from datahub.metadata.schemas import getMetadataChangeProposalSchema

        self._schema = fastavro.parse_schema(json.loads(getMetadataChangeProposalSchema()))
        self._header = b"\x00" + schema_id
        self._json: dict[int, tuple[Any, str]] = {}
        self._meta: dict[int, tuple[Any, Any]] = {}
        self._constant: dict[str, str] = {}

    def aspect_json(self, mcp: Any) -> str:
        from datahub.emitter.serialization_helper import pre_json_transform

        hit = self._json.get(id(mcp))
        if hit is None or hit[0] is not mcp:
            hit = (mcp, json.dumps(pre_json_transform(mcp.aspect.to_obj())))
            self._json[id(mcp)] = hit
        return hit[1]

    def fingerprint(self, mcp: Any) -> str:
        import hashlib

        if mcp.aspectName == "status":
            # Decider asks for the fingerprint of removal_mcp(urn) once per primary URN: a constant.
            key = f"status:{mcp.aspect.removed}"
            if key not in self._constant:
                self._constant[key] = hashlib.sha256(f"status:{self.aspect_json(mcp)}".encode()).hexdigest()[:24]
            return self._constant[key]
        return hashlib.sha256(f"{mcp.aspectName}:{self.aspect_json(mcp)}".encode()).hexdigest()[:24]

    def value(self, mcp: Any) -> bytes:
        """The Avro record as plain data: the aspect's JSON made once, the system metadata (one
        object per change event) converted once per event, the rest of the envelope by hand."""
        import io

        import fastavro

        meta = mcp.systemMetadata
        hit = self._meta.get(id(meta))
        if hit is None or hit[0] is not meta:
            hit = (meta, meta.to_obj(tuples=True) if meta is not None else None)
            self._meta[id(meta)] = hit
        record: dict[str, Any] = {
            "entityType": mcp.entityType, "entityUrn": ("string", str(mcp.entityUrn)),
            "changeType": str(mcp.changeType), "aspectName": ("string", str(mcp.aspectName)),
            "aspect": ("com.linkedin.pegasus2avro.mxe.GenericAspect",
                       {"value": self.aspect_json(mcp).encode(), "contentType": "application/json"}),
        }
        if hit[1] is not None:
            record["systemMetadata"] = hit[1]
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self._schema, record)
        return buf.getvalue()

    def forget(self) -> None:
        self._json.clear()
        self._meta.clear()


def part_f(b: Bench) -> None:
    from confluent_kafka.serialization import MessageField, SerializationContext
    from datahub.emitter.kafka_emitter import MCE_KEY, MCP_KEY, DatahubKafkaEmitter, KafkaEmitterConfig

    from connector.contract import codec
    from connector.contract.envelope import entity_changed, source_block
    from connector.datahub.decisions import Decider, PartitionState, Policy, aspect_fingerprint
    from connector.datahub.mapping import MappingSettings, to_mcps
    from connector.kafka.mcp_serde import McpSerializer
    from connector.mlflow.listing import full_listing
    from connector.mlflow.reader import MlflowReader, ReaderSettings

    say("(f) consumer throughput on one core: our path vs DataHub's emitter serialisation")
    reader = MlflowReader(ReaderSettings(tracking_uri=b.uri, registry_uri=b.uri))
    now = int(time.time() * 1000)
    events = [entity_changed("READ", kind, entity, source_block(b.uri, b.uri, now, "1-bench"), now)
              for kind, entity in full_listing(reader)]
    encoded = [codec.encode(e) for e in events]
    settings = MappingSettings()
    policy = Policy(enabled=True)
    topic = f"bench-f-{uuid.uuid4().hex[:8]}.mcp"
    ours = McpSerializer(b.registry, {}, topic)
    # DataHub's own emitter, built as its Kafka sink builds it; only its serialisers are used (nothing
    # is produced), and its idle producers are kept quiet.
    emitter = DatahubKafkaEmitter(KafkaEmitterConfig.model_validate(
        {"connection": {"bootstrap": b.bootstrap, "schema_registry_url": b.registry,
                        "producer_config": {"log_level": 0}},
         "topic_routes": {MCP_KEY: topic, MCE_KEY: f"{topic}.mce-unused"}}))
    producer = emitter.producers[MCP_KEY]
    theirs_key, theirs_value = producer._key_serializer, producer._value_serializer  # what produce() calls
    emitter.producers.clear()
    del emitter, producer
    ctx_key, ctx_value = SerializationContext(topic, MessageField.KEY), SerializationContext(topic, MessageField.VALUE)

    def consumer_path(state: PartitionState, decode: bool) -> tuple[int, int]:
        """One pass of the consumer's per-event work; returns (MCPs written, MCPs considered)."""
        written = considered = 0
        for raw, ev in zip(encoded, events, strict=True):
            event = codec.decode(raw) if decode else ev
            transformed = to_mcps(event, settings)
            assert transformed.entity is not None
            outcome = Decider(state, policy).entity(event, transformed.entity)
            considered += len(transformed.entity.mcps)
            for mcp in outcome.mcps:
                ours.key(mcp)
                ours.value(mcp)
                written += 1
            state.apply(outcome.state)
        return written, considered

    # The MCPs the consumer writes for a first snapshot: what DataHub's emitter gets to serialise.
    # They are rebuilt (untouched) before each timed pass: the connector may memoise a proposal's
    # serialisation on the MCP object itself, and DataHub's emitter would get fresh objects.
    state = PartitionState()
    written_at: list[list[int]] = []
    for ev in events:
        transformed = to_mcps(ev, settings)
        assert transformed.entity is not None
        outcome = Decider(state, policy).entity(ev, transformed.entity)
        ids = {id(m) for m in outcome.mcps}
        written_at.append([j for j, m in enumerate(transformed.entity.mcps) if id(m) in ids])
        state.apply(outcome.state)

    def fresh_mcps() -> list[Any]:
        out = []
        for ev, positions in zip(events, written_at, strict=True):
            built = to_mcps(ev, settings).entity.mcps  # type: ignore[union-attr]
            out.extend(built[j] for j in positions)
        return out

    mcps = fresh_mcps()
    ours.value(fresh_mcps()[0])
    theirs_value(mcps[0], ctx_value)  # registers the subject once, for both

    def datahub_path(batch: list[Any]) -> None:
        for mcp in batch:
            theirs_key(str(mcp.entityUrn), ctx_key)
            theirs_value(mcp, ctx_value)

    def build_only(_: object) -> None:
        for ev in events:
            to_mcps(ev, settings)

    def fingerprint_only(batch: list[Any]) -> None:
        for mcp in batch:
            aspect_fingerprint(mcp)

    def serialise_only(batch: list[Any]) -> None:
        for mcp in batch:
            ours.key(mcp)
            ours.value(mcp)

    # (1*) A prototype, NOT the connector's code: what the consumer's path costs when each aspect is
    # converted once (avrogen's to_obj dominates both paths): the aspect's JSON is made once and
    # serves both the dedupe fingerprint and the Avro record, written by fastavro with the same
    # schema. Its output is checked byte for byte against DataHub's serialiser below.
    fast = FastMcpWriter(theirs_value(mcps[0], ctx_value)[1:5])
    mismatches = sum(1 for mcp in mcps if fast.value(mcp) != theirs_value(mcp, ctx_value))
    # And the connector's own serialiser, which must write DataHub's bytes too.
    ours_mismatches = sum(1 for a, c in zip(fresh_mcps(), fresh_mcps(), strict=True)
                          if ours.value(a) != theirs_value(c, ctx_value))

    def prototype_path(state: PartitionState) -> None:
        import connector.datahub.decisions as state_module

        original = state_module.aspect_fingerprint
        state_module.aspect_fingerprint = fast.fingerprint  # type: ignore[assignment]
        try:
            for ev in events:
                transformed = to_mcps(ev, settings)
                assert transformed.entity is not None
                outcome = Decider(state, policy).entity(ev, transformed.entity)
                for mcp in outcome.mcps:
                    ours.key(mcp)
                    fast.value(mcp)
                state.apply(outcome.state)
                fast.forget()
        finally:
            state_module.aspect_fingerprint = original

    full = PartitionState()
    consumer_path(full, decode=False)
    def none() -> None:
        return None

    # name -> (untimed set-up, timed pass over what the set-up returned)
    paths: dict[str, tuple[Callable[[], Any], Callable[[Any], object]]] = {
        "ours": (none, lambda _: consumer_path(PartitionState(), decode=False)),
        "ours_decode": (none, lambda _: consumer_path(PartitionState(), decode=True)),
        "again": (none, lambda _: consumer_path(full, decode=False)),
        "theirs": (fresh_mcps, datahub_path),
        "build": (none, build_only),
        "fingerprint": (fresh_mcps, fingerprint_only),
        "serialise": (fresh_mcps, serialise_only),
        "prototype": (none, lambda _: prototype_path(PartitionState())),
    }
    # Pinned to one core; the paths take turns round after round, and each is credited with its
    # best round in thread CPU time (what the work costs, whatever else runs on the machine).
    cpu = max(os.sched_getaffinity(0))
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    rounds = b.args.rounds
    cpu_times: dict[str, list[float]] = {k: [] for k in paths}
    wall_times: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for _ in range(rounds):
            for name, (setup, fn) in paths.items():
                arg = setup()
                w, c = time.perf_counter(), time.thread_time()
                fn(arg)
                cpu_times[name].append(time.thread_time() - c)
                wall_times[name].append(time.perf_counter() - w)
    finally:
        os.sched_setaffinity(0, previous)
    best = {k: min(v) for k, v in cpu_times.items()}
    first, first_decode, again, theirs = best["ours"], best["ours_decode"], best["again"], best["theirs"]
    build, fingerprint, serialise, prototype = best["build"], best["fingerprint"], best["serialise"], best["prototype"]

    n = len(mcps)
    considered = sum(len(to_mcps(ev, settings).entity.mcps) for ev in events)  # type: ignore[union-attr]
    rate = {
        "ours_first_snapshot": n / first,
        "ours_first_snapshot_with_event_decode": n / first_decode,
        "datahub_serialisation_only": n / theirs,
        "datahub_build_and_serialise": n / (build + theirs),
        "ours_resnapshot_unchanged_per_mcp_considered": considered / again,
        "prototype_single_conversion": n / prototype,
    }
    breakdown_us = {"to_mcps_per_mcp_written": 1e6 * build / n,
                    "fingerprint_per_mcp_written": 1e6 * fingerprint / n,
                    "our_serialise_per_mcp": 1e6 * serialise / n,
                    "datahub_serialise_per_mcp": 1e6 * theirs / n}
    figures = {"events": len(events), "mcps_written": n, "mcps_considered": considered, "cpu": cpu,
               "rounds": rounds, "mcps_per_second": rate, "microseconds": breakdown_us,
               "cpu_seconds": cpu_times, "wall_seconds": wall_times,
               "ratio_ours_vs_datahub_serialisation": rate["ours_first_snapshot"] / rate["datahub_serialisation_only"],
               "ratio_ours_vs_datahub_build_and_serialise":
                   rate["ours_first_snapshot"] / rate["datahub_build_and_serialise"],
               "ratio_resnapshot_vs_datahub_build_and_serialise":
                   rate["ours_resnapshot_unchanged_per_mcp_considered"] / rate["datahub_build_and_serialise"],
               "ratio_prototype_vs_datahub_serialisation":
                   rate["prototype_single_conversion"] / rate["datahub_serialisation_only"],
               "prototype_byte_mismatches": mismatches, "connector_byte_mismatches": ours_mismatches}
    b.record("f", figures)
    say(f"    {len(events)} change events -> {n} MCPs written ({considered} built; the rest deduplicated), "
        f"pinned to CPU {cpu}, best of {rounds} rounds in thread CPU time")
    say(f"    (1) ours, first snapshot: to_mcps + Decider + McpSerializer  {rate['ours_first_snapshot']:8.0f} MCP/s "
        f"(bytes identical to DataHub's for {n - ours_mismatches} of {n})")
    say(f"        ... plus decoding the change event                       "
        f"{rate['ours_first_snapshot_with_event_decode']:8.0f} MCP/s")
    say(f"    (2) DataHub's emitter serialisation of the same MCPs         "
        f"{rate['datahub_serialisation_only']:8.0f} MCP/s")
    say(f"    (2') DataHub incl. building the MCPs (to_mcps as stand-in)   "
        f"{rate['datahub_build_and_serialise']:8.0f} MCP/s")
    say(f"    (1'') ours, re-snapshot of an unchanged store (all deduplicated) "
        f"{rate['ours_resnapshot_unchanged_per_mcp_considered']:8.0f} MCP/s considered")
    say(f"    (1*) prototype, one conversion per aspect (not the connector) "
        f"{rate['prototype_single_conversion']:8.0f} MCP/s; output identical to DataHub's for "
        f"{n - mismatches} of {n} MCPs")
    say(f"    ratio (1)/(2) = {figures['ratio_ours_vs_datahub_serialisation']:.2f}, "
        f"(1)/(2') = {figures['ratio_ours_vs_datahub_build_and_serialise']:.2f}, "
        f"(1'')/(2') = {figures['ratio_resnapshot_vs_datahub_build_and_serialise']:.2f}, "
        f"(1*)/(2) = {figures['ratio_prototype_vs_datahub_serialisation']:.2f}")
    say("    per MCP written: " + ", ".join(f"{k} {v:.0f} us" for k, v in breakdown_us.items()))


# -- (e) idle cycles ------------------------------------------------------------------------------


def bursts(requests: list[tuple[float, str]], gap: float) -> list[list[tuple[float, str]]]:
    groups: list[list[tuple[float, str]]] = []
    for r in requests:
        if groups and r[0] - groups[-1][-1][0] < gap:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def part_e(b: Bench) -> None:
    poll = b.args.idle_poll_interval
    cycles = b.args.idle_cycles
    say(f"(e) MLflow requests per idle cycle of `mlflow-datahub run` (poll every {poll:g} s, {cycles} cycles)")
    path, data = b.config("idle", poll=poll)
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-idle"), b.workdir / "idle")
    try:
        ready = wait_snapshot_consumed(child, data, b.args.timeout)
        gap = 0.6 * poll
        # Skip the first cycle after the snapshot; then count whole cycles (bursts of requests
        # separated by the poll wait) until `cycles` of them are complete.
        deadline = time.monotonic() + (cycles + 3) * poll + b.args.timeout
        start = None
        groups: list[list[tuple[float, str]]] = []
        while time.monotonic() < deadline:
            time.sleep(poll / 4)
            seen = bursts(b.requests(ready, time.time() - 0.1), gap)
            if start is None:
                if len(seen) >= 2:
                    start = seen[1][0][0] - 0.01
                continue
            groups = bursts(b.requests(start, time.time()), gap)
            if len(groups) > cycles:
                groups = groups[:cycles]
                break
        else:
            groups = []
        window_end = time.time()
    finally:
        fin = child.stop()
    if groups:
        total = sum(len(g) for g in groups)
        per_cycle = total / len(groups)
        durations = [g[-1][0] - g[0][0] for g in groups]
        method = f"{len(groups)} cycles seen as bursts of requests"
        flat = [r for g in groups for r in g]
    else:
        # No bursts (an implementation that makes no request while idle): count a time window.
        start = start or ready
        flat = b.requests(start, window_end)
        total = len(flat)
        n = max(1.0, (window_end - start) / poll)
        per_cycle = total / n
        durations = []
        method = f"{window_end - start:.0f} s window / poll interval"
    figures = {"scale": b.shape.name, "poll_interval": poll, "requests_per_cycle": per_cycle, "requests": total,
               "method": method, "per_cycle_endpoints": {k: v / max(1, len(groups)) for k, v in
                                                         endpoint_counts(flat).items()},
               "cycle_seconds_median": statistics.median(durations) if durations else None,
               "run_maxrss_mb": fin.maxrss_mb}
    b.record("e", figures)
    say(f"    {per_cycle:.1f} requests per idle cycle at {b.shape.name} ({total} requests, {method}); "
        f"per cycle: {', '.join(f'{v:g} {k}' for k, v in figures['per_cycle_endpoints'].items())}")
    if durations:
        say(f"    an idle cycle's requests span {statistics.median(durations):.2f} s (median)")


# -- (g) memory -----------------------------------------------------------------------------------


def part_g(b: Bench) -> None:
    say("(g) peak resident memory: `produce` and `consume` run separately over a complete snapshot")
    path, data = b.config("memory", poll=3600)
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
    while not caught_up(k["bootstrap_servers"], k["consumer_group"], k["topics"]["changes"]):
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


# -- (d) freshness --------------------------------------------------------------------------------


class McpTracker:
    """Reads the MCP topic from its current end and stamps each arrival of the watched aspects."""

    def __init__(self, bootstrap: str, registry: str, topic: str, aspects: set[str]) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        from connector.kafka.mcp_serde import McpDeserializer

        self.aspects = aspects
        self.arrivals: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._decode = McpDeserializer(registry, {}, topic)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-tracker-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed"})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.parts = [TopicPartition(topic, p, OFFSET_END) for p in partitions]
        self.consumer.assign(self.parts)
        deadline = time.monotonic() + 30
        while any(tp.offset < 0 for tp in self.consumer.position(self.parts)) and time.monotonic() < deadline:
            self.consumer.consume(100, timeout=0.2)
        self._thread = threading.Thread(target=self._loop, name="mcp-tracker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(500, timeout=0.05):
                now = time.time()
                if msg.error() or msg.value() is None:
                    continue
                mcp = self._decode(msg.value())
                if mcp.aspectName not in self.aspects or mcp.aspect is None:
                    continue
                value = mcp.aspect.value
                text = value.decode() if isinstance(value, bytes) else str(value)
                with self._lock:
                    self.arrivals.setdefault((str(mcp.entityUrn), str(mcp.aspectName)), []).append((now, text))

    def arrival(self, urn: str, aspect: str, marker: str, after: float) -> float | None:
        with self._lock:
            for t, text in self.arrivals.get((urn, aspect), []):
                if t >= after and marker in text:
                    return t
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


@dataclass
class Write:
    started: float
    urn: str
    aspect: str
    marker: str


def webhooks_available() -> bool:
    """Does the installed connector have the webhook receiver yet (config key and command)?"""
    from connector.config import ConnectorConfig

    if "webhooks" not in ConnectorConfig.model_fields:
        return False
    return subprocess.run(connector_cli("webhooks", "--help"), cwd=REPO, capture_output=True).returncode == 0


def measure_writes(b: Bench, tracker: McpTracker, label: str, count: int, write: Callable[[int, str], Write],
                   wait: float) -> dict[str, Any]:
    rng = random.Random(7)
    writes = []
    for i in range(count):
        writes.append(write(i, f"fresh-{label}-{i}-{uuid.uuid4().hex[:8]}"))
        time.sleep(rng.uniform(*b.args.write_spacing))
    deadline = time.monotonic() + wait
    latencies: list[float | None] = [None] * count
    while time.monotonic() < deadline:
        for i, w in enumerate(writes):
            if latencies[i] is None:
                t = tracker.arrival(w.urn, w.aspect, w.marker, w.started)
                latencies[i] = None if t is None else t - w.started
        if all(x is not None for x in latencies):
            break
        time.sleep(0.2)
    seen = [x for x in latencies if x is not None]
    figures: dict[str, Any] = {"writes": count, "arrived": len(seen)}
    if seen:
        figures.update(p50=percentile(seen, 50), p95=percentile(seen, 95), max=max(seen), min=min(seen))
    return figures


def part_d(b: Bench) -> None:
    from mlflow import MlflowClient

    from connector.datahub.mapping import MappingSettings, model_urn, run_urn

    poll = b.args.poll_interval
    extra: dict[str, Any] = {}
    # ---- WEBHOOKS ------------------------------------------------------------------------------
    # The connector's webhook receiver is being built: config key `webhooks: {listen, secret}` and
    # `mlflow-datahub webhooks install -c FILE` (registers the receiver with MLflow). With
    # --webhooks auto (the default) they are used as soon as the installed connector has both;
    # --webhooks on insists, --webhooks off measures polling only. The bench's MLflow server is
    # started with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS
    # so that it may deliver to a receiver on loopback over HTTP.
    webhooks = b.args.webhooks == "on" or (b.args.webhooks == "auto" and webhooks_available())
    if webhooks:
        extra["webhooks"] = {"listen": f"127.0.0.1:{free_port()}", "secret": uuid.uuid4().hex}
    path, data = b.config("freshness", extra=extra)
    if webhooks:
        installed = subprocess.run(connector_cli("webhooks", "install", "-c", path), cwd=REPO, capture_output=True,
                                   text=True)
        if installed.returncode != 0:
            raise RuntimeError(f"webhooks install failed:\n{installed.stdout}\n{installed.stderr}")
    # ---------------------------------------------------------------------------------------------
    mode = "webhooks" if webhooks else f"polling every {poll:g} s"
    say(f"(d) freshness of `mlflow-datahub run` ({mode}): MLflow write -> its MCP read from the topic")
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-freshness"), b.workdir / "freshness")
    client = MlflowClient(b.uri, registry_uri=b.uri)
    settings = MappingSettings()
    experiment = client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}0000")
    assert experiment is not None
    tracker = None
    try:
        wait_snapshot_consumed(child, data, b.args.timeout)
        tracker = McpTracker(b.bootstrap, b.registry, data["kafka"]["topics"]["mcp"],
                             {"mlModelProperties", "dataProcessInstanceProperties"})

        def registry_change(i: int, marker: str) -> Write:
            name = f"{MODEL_PREFIX}{i % b.shape.models:04d}"
            version = str(1 + (i // b.shape.models) % b.shape.versions_per_model)
            started = time.time()
            client.set_model_version_tag(name, version, "bench_freshness", marker)
            return Write(started, model_urn(name, version, settings), "mlModelProperties", marker)

        def new_run(i: int, marker: str) -> Write:
            started = time.time()
            run = client.create_run(experiment.experiment_id, run_name=marker)
            return Write(started, run_urn(run.info.run_id), "dataProcessInstanceProperties", marker)

        wait = 10 * poll + b.args.timeout
        registry = measure_writes(b, tracker, "registry", b.args.writes, registry_change, wait)
        registry["mode"] = mode
        say(f"    registry change (model version tag), {mode}: " + describe_latency(registry))
        runs = measure_writes(b, tracker, "run", b.args.writes, new_run, wait)
        runs["mode"] = f"polling every {poll:g} s"
        say(f"    new run, polling every {poll:g} s: " + describe_latency(runs))
        b.record("d", {"registry": registry, "run": runs, "poll_interval": poll, "webhooks": webhooks})
    finally:
        if tracker is not None:
            tracker.close()
        fin = child.stop()
        if fin.rc not in (0, -signal.SIGTERM):
            say(f"    run exited {fin.rc}:\n{tail(fin.stderr)}")


def describe_latency(f: dict[str, Any]) -> str:
    if not f.get("arrived"):
        return f"none of {f['writes']} writes arrived"
    text = f"p50 {f['p50']:.2f} s, p95 {f['p95']:.2f} s, max {f['max']:.2f} s over {f['arrived']} writes"
    if f["arrived"] < f["writes"]:
        text += f" ({f['writes'] - f['arrived']} never arrived)"
    return text


# -- summary --------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("MET " if ok else "MISS")


def summary(b: Bench) -> None:
    r = b.results
    say()
    say(f"== summary ({b.shape.name}: {b.shape.describe()})")
    a, bb, c, d, e, f, g = (r.get(x) for x in "abcdefg")
    if bb and c:
        # Like for like: (c) is the wall time of a command, so the floor is taken as a command too
        # (Python start and importing MLflow's client, which both pay); the in-process ratio is shown.
        ratio = c["seconds"] / bb["process_wall_seconds"]
        say(f"[{verdict(ratio <= 2)}] (c)/(b) = {c['seconds']:.2f} / {bb['process_wall_seconds']:.2f} s = "
            f"{ratio:.1f}x, both as commands (target <= 2x); against the floor's reading alone, in-process "
            f"({bb['seconds']:.2f} s): {c['seconds'] / bb['seconds']:.1f}x")
    if a and c:
        ratio = a["seconds"] / c["seconds"]
        floor = ""
        if bb:
            floor = f"; the floor itself is {a['seconds'] / bb['process_wall_seconds']:.1f}x faster than (a)"
            if bb.get("server_cpu_seconds"):
                floor += (f", and MLflow's server alone needs {bb['server_cpu_seconds']:.2f} s of CPU to answer a "
                          f"full read: (a) / that = {a['seconds'] / bb['server_cpu_seconds']:.1f}x, the most any "
                          "client of this server can reach")
        if c.get("server_cpu_seconds") is not None:
            cores = os.cpu_count() or 1
            budget = (c["cpu_seconds"] + c["server_cpu_seconds"]) / cores
            floor += (f"; the snapshot's CPU, its own {c['cpu_seconds']:.1f} s and the server's "
                      f"{c['server_cpu_seconds']:.1f} s, over {cores} cores takes at least {budget:.1f} s: "
                      f"(a) / that = {a['seconds'] / budget:.1f}x")
        say(f"[{verdict(ratio >= 25)}] (a)/(c) = {a['seconds']:.1f} / {c['seconds']:.2f} s = {ratio:.1f}x faster "
            f"(target >= 25x{floor})")
    if d:
        poll = d["poll_interval"]
        reg, run = d["registry"], d["run"]
        ok = reg.get("p95") is not None and reg["p95"] < 2 and reg["arrived"] == reg["writes"]
        say(f"[{verdict(ok)}] (d) registry change p95 {reg.get('p95', float('nan')):.2f} s ({reg['mode']}; "
            f"target < 2 s)")
        ok = run.get("p95") is not None and run["p95"] < poll + 1 and run["arrived"] == run["writes"]
        say(f"[{verdict(ok)}] (d) new run p95 {run.get('p95', float('nan')):.2f} s (target < poll interval + 1 = "
            f"{poll + 1:g} s)")
    if e:
        others = {}
        for p in sorted(CACHE.glob("results-*.json")):
            try:
                other = json.loads(p.read_text()).get("results", {}).get("e")
            except (OSError, json.JSONDecodeError):
                continue
            if other and other.get("scale") != e["scale"] and \
                    other.get("scale", "").startswith("quick") == e["scale"].startswith("quick"):
                others[other["scale"]] = other["requests_per_cycle"]
        others[e["scale"]] = e["requests_per_cycle"]
        small, large = ("quick-x1", "quick-x10") if e["scale"].startswith("quick") else ("x1", "x10")
        if small in others and large in others:
            ok = others[large] <= max(others[small] * 1.1, others[small] + 1)
            say(f"[{verdict(ok)}] (e) requests per idle cycle: {small} {others[small]:.1f}, {large} "
                f"{others[large]:.1f} (target: the same)")
        else:
            say(f"[{verdict(None)}] (e) requests per idle cycle: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(others.items()))
                + " (run the other scale too: results are kept in .cache/bench/)")
    if f:
        ratio = f["ratio_ours_vs_datahub_serialisation"]
        say(f"[{verdict(ratio >= 1.5)}] (f) ours / DataHub serialisation = {ratio:.2f} (target >= 1.5); "
            f"ours / DataHub incl. building = {f['ratio_ours_vs_datahub_build_and_serialise']:.2f}; "
            f"re-snapshot (deduplicated) / DataHub incl. building = "
            f"{f['ratio_resnapshot_vs_datahub_build_and_serialise']:.2f}; prototype serialiser (not the "
            f"connector) / DataHub = {f['ratio_prototype_vs_datahub_serialisation']:.2f}")
    if g:
        worst = max(v for k, v in g.items() if k.endswith("_mb") and v)
        ok = worst < 500 if g["scale"] == "x10" else None
        say(f"[{verdict(ok)}] (g) peak RSS produce {g['produce_mb']:.0f} MB, consume {g['consume_mb']:.0f} MB "
            f"at {g['scale']} (target < 500 MB at x10)")


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
    p.add_argument("--profile", action="store_true", help="(c): also run a snapshot under cProfile and print it")
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
    started = time.time()
    steps = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f, "g": part_g}
    failed = []
    try:
        for part in PARTS:
            if part in args.parts:
                say()
                try:
                    steps[part](b)
                except Exception as e:  # noqa: BLE001 - one failed part must not hide the others
                    failed.append(part)
                    say(f"    ({part}) FAILED: {type(e).__name__}: {e}")
    finally:
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
