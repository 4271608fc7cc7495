"""(e) MLflow requests per idle incremental cycle of `mlflow-datahub run`: the requests after the
first snapshot, grouped in bursts (one per poll), compared between scales in the summary."""

from __future__ import annotations

import statistics
import time

from bench.common import Bench, endpoint_counts, say, wait_snapshot_consumed
from bench.processes import Child, connector_cli


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
    path, data = b.config("idle", poll=poll, uri=b.server.uri)
    child = Child(connector_cli("run", "-c", path, "--instance-id", "bench-idle"), b.workdir / "idle")
    try:
        ready = wait_snapshot_consumed(b.connection, child, data, b.args.timeout)
        gap = 0.6 * poll
        # Skip the first cycle after the snapshot; then count whole cycles (bursts of requests
        # separated by the poll wait) until `cycles` of them are complete.
        # Bounded whatever the scale: cycles that never look idle (bursts that merge) end in the window count.
        deadline = time.monotonic() + (cycles + 3) * poll + min(b.args.timeout, 120.0)
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
