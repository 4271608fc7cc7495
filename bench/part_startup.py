"""(s) Start-up: from the command's start (the bench starts the process) to its first MLflow request, as
a proxy in front of the server sees it arrive; and to its second request, the first page of the
listing (`snapshot`) or of the first cycle (`run`): the reachability check comes before it. `snapshot` and `run`, each
on fresh topics (a first start: the topics are created) and again on the same topics (a restart). Each
command is stopped as soon as its first pages are seen."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import Bench, say
from bench.processes import Child, connector_cli, log_time

TARGET_SECONDS = 1.0


def first_requests(b: Bench, argv: list[Any], logs: str, timeout: float, need: int = 2,
                   env: dict[str, str] | None = None) -> dict[str, float | None]:
    """Start a command, wait for its first `need` MLflow requests at the stamping proxy, stop it."""
    assert b.stamp is not None
    child = Child(argv, b.workdir / logs, env=env)
    first = listing = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and child.alive():
            requests = b.stamp.requests(child.started)
            if requests:
                first = requests[0][0]
            # The reachability check (one experiment) comes first; the listing's (or cycle's) first page next.
            if len(requests) >= need:
                listing = requests[need - 1][0]
                break
            time.sleep(0.01)
    finally:
        fin = child.stop(60)
    logged = log_time(fin.stderr, r".")
    return {"first_request": None if first is None else first - child.started,
            "first_page": None if listing is None else listing - child.started,
            "first_log_line": None if logged is None else logged - child.started}


def part_s(b: Bench) -> None:
    b.stamped_uri()
    rounds = max(1, b.args.repeat_startup)
    say(f"(s) start-up: command start -> first MLflow request (stamped by a proxy), {rounds} rounds each; "
        "fresh topics, then the same topics again")
    figures: dict[str, Any] = {}
    for command in ("snapshot", "run"):
        path, _ = b.config(f"startup-{command}", uri=b.stamp.uri if b.stamp else None)  # type: ignore[union-attr]
        argv = connector_cli(command, "-c", path, "--instance-id", "bench-startup")
        fresh = first_requests(b, argv, f"startup-{command}-fresh", b.args.timeout)
        again = [first_requests(b, argv, f"startup-{command}-{i}", b.args.timeout) for i in range(rounds)]
        firsts = [r["first_request"] for r in again if r["first_request"] is not None]
        pages = [r["first_page"] for r in again if r["first_page"] is not None]
        figures[command] = {
            "fresh_topics": fresh, "rounds": again,
            "first_request_median": statistics.median(firsts) if firsts else None,
            "first_page_median": statistics.median(pages) if pages else None,
        }

        def fmt(x: float | None) -> str:
            return "none" if x is None else f"{x:.2f} s"

        say(f"    {command}: first request {fmt(figures[command]['first_request_median'])}, first page "
            f"{fmt(figures[command]['first_page_median'])} (median; rounds: "
            + ", ".join(f"{fmt(r['first_request'])}/{fmt(r['first_page'])}" for r in again)
            + f"); on fresh topics {fmt(fresh['first_request'])}/{fmt(fresh['first_page'])}")
    # The bounds: Python's start and importing MLflow's client, which every client built on it pays before
    # its first request (the floor as a command, DataHub's source), and a client that speaks HTTP itself.
    import os
    import subprocess
    import sys

    from bench.part_floor import ENTRY_POINT
    from bench.part_original import ORIGINAL_VENV
    from bench.scale_fixture import REPO

    def timed(code: str) -> float:
        runs = []
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
            runs.append(time.monotonic() - t0)
        return statistics.median(runs)

    uri = b.stamp.uri  # type: ignore[union-attr]
    bounds: dict[str, Any] = {
        "python_start": timed("pass"),
        "python_and_cli_import": timed("import connector.cli"),
        "python_and_mlflow_client_import": timed("import connector.mlflow.reader"),
        "floor_command_first_request": first_requests(b, [sys.executable, ENTRY_POINT, "--floor-only", uri],
                                                      "startup-floor", 60, need=1)["first_request"],
        "plain_http_first_request": first_requests(b, [sys.executable, "-c", "import sys, urllib.request; "
                                                       "urllib.request.urlopen(sys.argv[1] + '/api/2.0/mlflow/"
                                                       "experiments/search?max_results=1').read()", uri],
                                                   "startup-http", 60, need=1)["first_request"],
    }
    cli = ORIGINAL_VENV / "bin" / "datahub"
    if cli.exists():
        import yaml

        recipe = b.workdir / "startup-original.yml"
        recipe.write_text(yaml.safe_dump({"source": {"type": "mlflow", "config": {"tracking_uri": uri}},
                                          "sink": {"type": "file", "config": {"filename": str(b.workdir / "x.json")}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATAHUB_", "VIRTUAL_ENV"))}
        env["DATAHUB_TELEMETRY_ENABLED"] = "false"
        bounds["original_first_request"] = first_requests(b, [cli, "ingest", "-c", recipe], "startup-original", 120,
                                                          need=1, env=env)["first_request"]
    figures["bounds"] = bounds
    say("    for scale (median of 3 where timed alone): " + ", ".join(
        f"{k.replace('_', ' ')} {'?' if v is None else f'{v:.2f} s'}" for k, v in bounds.items()))
    b.record("s", figures)
