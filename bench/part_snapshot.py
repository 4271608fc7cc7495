"""(c) `mlflow-datahub snapshot` with fresh topics, until the last MCP of its snapshot is acknowledged:
wall time (median of --repeat-snapshot rounds) against the same command without reading signatures
(the peer, measured in the same run), its start-up/producer/consumer split, the MLflow requests, the
CPU of the command and of the MLflow server; then the features pass the command makes after the
snapshot (the signatures read once ever); --profile adds a cProfile of another snapshot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from bench.common import Bench, endpoint_counts, say
from bench.processes import Child, Finished, _process_tree, connector_cli, log_time, tail
from bench.processes import _vm_hwm_mb as _hwm
from bench.scale_fixture import REPO

ARTIFACT_ENDPOINT = "GET /model-versions/get-artifact"  # a signature's read, as endpoint_counts names it


Round = tuple[Child, Finished, float, float, "float | None"]


def _round(b: Bench, name: str, extra: dict | None = None) -> Round:
    """One `mlflow-datahub snapshot` on topics of its own (a first snapshot): (the command, how it finished,
    the MLflow server's CPU, the machine's busy CPU, the stack's CPU)."""
    path, data = b.config(name, extra=extra)
    cpu0, busy0, stack0 = b.server_cpu_seconds(), b.machine_busy_seconds(), b.stack_cpu_seconds()
    child = Child(connector_cli("snapshot", "-c", path), b.workdir / name)
    fin = child.wait(b.args.timeout)
    busy = b.machine_busy_seconds() - busy0
    stack1 = b.stack_cpu_seconds()
    stack_cpu = None if stack0 is None or stack1 is None else stack1 - stack0
    b.server.access.settle()  # type: ignore[union-attr]
    server_cpu = b.server_cpu_seconds() - cpu0
    if fin.rc != 0:
        raise RuntimeError(f"snapshot failed ({fin.rc}):\n{tail(fin.stderr)}\n{tail(fin.stdout)}")
    return child, fin, server_cpu, busy, stack_cpu


def snapshot_seconds(child: Child, fin: Finished) -> float:
    """The command's start until every MCP of its snapshot was acknowledged (its log line), before the
    features pass that reads the signatures the snapshot met unread; the whole command without one."""
    acknowledged = log_time(fin.stderr, r"snapshot \S+: every MCP of it acknowledged")
    return fin.wall if acknowledged is None else acknowledged - child.started


def _median(rounds: list[Round]) -> Round:
    return sorted(rounds, key=lambda r: snapshot_seconds(r[0], r[1]))[len(rounds) // 2]


def part_c(b: Bench) -> None:
    say("(c) connector: `mlflow-datahub snapshot` with fresh topics, until the last MCP of the snapshot is "
        "acknowledged; then its features pass")
    # Each round on topics of its own, like a first snapshot; the median round is reported (as (b)). The peer,
    # in the same run: the same command without reading signatures (`producer.read_signatures: false`, the
    # connector before features), what a snapshot cost before issue 19. A warm-up round first (the first
    # command after the server started is slower), then the two take turns.
    without = {"producer": {"read_signatures": False}}
    warm = _round(b, "snapshot-warm-up", without)
    say(f"    (warm-up round, not counted: {snapshot_seconds(warm[0], warm[1]):.2f} s)")
    rounds: list[Round] = []
    peer_rounds: list[Round] = []
    for i in range(b.args.repeat_snapshot):
        rounds.append(_round(b, f"snapshot-{i + 1}"))
        peer_rounds.append(_round(b, f"snapshot-without-signatures-{i + 1}", without))
    walls = [snapshot_seconds(r[0], r[1]) for r in rounds]
    child, fin, server_cpu, busy, stack_cpu = _median(rounds)
    peer_walls = [snapshot_seconds(r[0], r[1]) for r in peer_rounds]
    peer_child, peer_fin, *_ = _median(peer_rounds)
    peer = snapshot_seconds(peer_child, peer_fin)
    snapshot = snapshot_seconds(child, fin)
    features = re.search(r"features: signatures of (\d+) of (\d+) model versions read after it, in ([\d.]+) s",
                         fin.stdout)
    cores = len(os.sched_getaffinity(0))
    end = child.started + fin.wall
    requests = b.requests(child.started, end + 0.5)
    snapshot_requests = b.requests(child.started, child.started + snapshot)
    mcps = int(re.search(r"MCPs acknowledged on \S+: (\d+)", fin.stdout).group(1))  # type: ignore[union-attr]
    events = int(re.search(r"events: (\d+)", fin.stdout).group(1))  # type: ignore[union-attr]
    own = float(re.search(r"seconds: ([\d.]+)", fin.stdout).group(1))  # type: ignore[union-attr]
    begun = log_time(fin.stderr, r"snapshot \S+ started")
    published = log_time(fin.stderr, r"snapshot \S+ (complete|INCOMPLETE)")
    split: dict[str, float] = {}
    if begun and published:
        split = {"startup": begun - child.started, "producer": published - begun,
                 "consumer": child.started + snapshot - published}
    # Python start-up and imports alone, for scale.
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c",
                    "import connector.cli, connector.pipeline.producer, connector.pipeline.consumer"],
                   cwd=REPO, check=True)
    imports = time.monotonic() - t0
    # Peak RSS of each process of the command (the command, which produces, and its consumer), and the MLflow
    # server's own peak since it started.
    processes_mb = sorted(child.peaks.values(), reverse=True)
    # CPU of each: the command's own process first (it produces), then its consumers.
    processes_cpu = [child.cpu.get(child.proc.pid, 0.0)] + sorted(
        (c for pid, c in child.cpu.items() if pid != child.proc.pid), reverse=True)
    server_mb = sum(v for v in (_hwm(p) for p in _process_tree(b.server.process.pid)) if v)  # type: ignore[union-attr]
    figures = {"processes_mb": processes_mb, "processes_cpu_seconds": processes_cpu, "server_peak_mb": server_mb,
               "seconds": snapshot, "rounds_seconds": walls, "command_seconds": fin.wall, "own_seconds": own,
               "without_signatures_seconds": peer, "without_signatures_rounds_seconds": peer_walls,
               "features_versions": int(features.group(1)) if features else 0,
               "features_seconds": float(features.group(3)) if features else None,
               "split": split, "mcps": mcps, "events": events, "snapshot_requests": len(snapshot_requests),
               "snapshot_artifact_requests": endpoint_counts(snapshot_requests).get(ARTIFACT_ENDPOINT, 0),
               "requests": len(requests), "request_endpoints": endpoint_counts(requests),
               "maxrss_mb": fin.maxrss_mb, "cpu_seconds": fin.cpu_seconds, "server_cpu_seconds": server_cpu,
               "machine_busy_seconds": busy, "cores": cores, "stack_cpu_seconds": stack_cpu,
               "python_imports_seconds": imports}
    b.record("c", figures)
    say(f"    the snapshot: {snapshot:.2f} s wall (median of {len(walls)}: {', '.join(f'{w:.2f}' for w in walls)}), "
        f"{len(snapshot_requests)} MLflow requests; without reading signatures (the peer, same run): {peer:.2f} s "
        f"(median of {len(peer_walls)}: {', '.join(f'{w:.2f}' for w in peer_walls)}): {snapshot / peer:.2f}x")
    if features:
        say(f"    then its features pass: the signatures of {features.group(1)} model versions, read once ever, in "
            f"{float(features.group(3)):.2f} s; the whole command {fin.wall:.2f} s")
    say(f"    the whole command: {fin.wall:.2f} s wall ({own:.1f} s by its own clock), {events} change events -> "
        f"{mcps} MCPs, {len(requests)} MLflow requests, CPU {fin.cpu_seconds:.1f} s (MLflow's server meanwhile "
        f"{server_cpu:.1f} s), peak RSS {fin.maxrss_mb:.0f} MB")
    say(f"    the machine meanwhile: {busy:.1f} s of CPU busy of {cores} x {fin.wall:.1f} s = "
        f"{busy / (cores * fin.wall):.0%}: the command {fin.cpu_seconds:.1f} s, MLflow's server {server_cpu:.1f} s, "
        + ("" if stack_cpu is None else f"the broker and the registry {stack_cpu:.1f} s, ")
        + "the rest (the bench, the kernel, anything else) "
        f"{busy - fin.cpu_seconds - server_cpu - (stack_cpu or 0):.1f} s")
    say(f"    the command's CPU by process: producer (the command itself) {processes_cpu[0]:.1f} s, consumer "
        + ", ".join(f"{c:.1f}" for c in processes_cpu[1:]) + " s")
    if split:
        say(f"    split: start-up (python, imports, topics, transactions, restore) {split['startup']:.2f} s, "
            f"producer (MLflow -> change topic) {split['producer']:.2f} s, "
            f"consumer (change topic -> MCP topic, acknowledged) {split['consumer']:.2f} s")
    say(f"    (python start + importing the connector alone: {imports:.2f} s)")
    say(f"    peak RSS of each of its processes: {', '.join(f'{m:.0f}' for m in processes_mb)} MB; MLflow's server "
        f"(its processes, since it started) {server_mb:.0f} MB")
    if b.proxy is not None:
        first = b.proxy.first(child.started)
        figures["first_request_seconds"] = None if first is None else first - child.started
    if b.args.profile:
        profile_snapshot(b)


def profile_snapshot(b: Bench) -> None:
    import pstats

    path, _ = b.config("snapshot-profile")
    out = b.workdir / "snapshot.prof"
    # The command ends with os._exit after running the exit functions (connector/cli.py): `python -m cProfile`
    # would never write its file, so the profile is written by an exit function of its own. A profile
    # follows one thread: each thread of the command (the producer's read-ahead of MLflow, the prefetch of
    # MLflow's pages) gets its own, written beside the main thread's as snapshot.prof.<thread name>.<n>,
    # and shown added up by thread name.
    code = ("import atexit, cProfile, runpy, sys, threading; profile = cProfile.Profile(); threads = []; "
            "run = threading.Thread.run\n"
            "def profiled(self):\n"
            "    p = cProfile.Profile(); threads.append((self.name, p)); p.enable()\n"
            "    try: run(self)\n"
            "    finally: p.disable()\n"
            "threading.Thread.run = profiled\n"
            "def dump():\n"
            f"    profile.dump_stats({str(out)!r})\n"
            "    for i, (name, p) in enumerate(threads):\n"
            f"        p.create_stats(); p.dump_stats(f'{str(out)}.{{name}}.{{i}}') if p.stats else None\n"
            "atexit.register(dump)\n"
            f"sys.argv = ['mlflow-datahub', 'snapshot', '-c', {str(path)!r}]; profile.enable()\n"
            "runpy.run_module('connector.cli', run_name='__main__')")
    child = Child([sys.executable, "-c", code], b.workdir / "snapshot-profile")
    fin = child.wait(b.args.timeout * 3)
    if fin.rc != 0:
        raise RuntimeError(f"profiled snapshot failed:\n{tail(fin.stderr)}")
    say(f"    cProfile of a second snapshot ({fin.wall:.1f} s under the profiler): {out} (main thread)")
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)
    by_name: dict[str, list[str]] = {}
    for thread in sorted(out.parent.glob(out.name + ".*")):
        by_name.setdefault(thread.name.removeprefix(out.name + ".").rsplit(".", 1)[0], []).append(str(thread))
    for name, files in by_name.items():
        busy = pstats.Stats(*files)
        if busy.total_tt < 1.0:  # type: ignore[attr-defined]
            continue
        say(f"    thread {name} ({len(files)} of that name, added up): {out}.{name}.*")
        busy.sort_stats("tottime").print_stats(25)
