"""(b) The floor: every experiment, run, registered model and model version read with bulk paged
searches and nothing else (in-process, and as a fresh command, which is what (c) is compared with),
the MLflow server's CPU for it, and the connector's own listing for comparison."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import Bench, say
from bench.scale_fixture import REPO

ENTRY_POINT = REPO / "bench" / "benchmark.py"  # `--floor-only URI`: floor_read as a command of its own


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
    rounds = []
    if b.args.repeat_floor > 0:
        floor_read(b.uri)  # warm-up: the server's first read of the store pays for the OS page cache
        b.server.access.settle()  # type: ignore[union-attr]
    for _ in range(b.args.repeat_floor):
        t0, cpu0 = time.time(), b.server_cpu_seconds()
        r = floor_read(b.uri)
        b.server.access.settle()  # type: ignore[union-attr]
        r["server_cpu_seconds"] = b.server_cpu_seconds() - cpu0
        r["requests"] = len(b.requests(t0, time.time()))
        rounds.append(r)
    figures: dict[str, Any] = {}
    if rounds:
        seconds = statistics.median(r["seconds"] for r in rounds)
        # What MLflow's server spends answering the floor's searches: its one worker serves them in
        # Python, one core at a time, so no client can read everything faster than this.
        server_cpu = statistics.median(r["server_cpu_seconds"] for r in rounds)
        counts = {k: rounds[0][k] for k in ("experiments", "runs", "registered_models", "model_versions")}
        best = min(rounds, key=lambda r: r["seconds"])
        figures.update({"seconds": seconds, "rounds": [r["seconds"] for r in rounds],
                        "requests": rounds[0]["requests"], "split_of_fastest": best["split"], "objects": counts,
                        "server_cpu_seconds": server_cpu})
        each = ", ".join(f"{r['seconds']:.2f}" for r in rounds)
        say(f"    {seconds:.2f} s (median of {len(rounds)}: {each}), "
            f"{rounds[0]['requests']} MLflow requests, objects {counts}")
        say(f"    MLflow's server: {server_cpu:.2f} s of CPU to answer them (median)")
        say("    fastest round by listing: " + ", ".join(f"{k} {v:.2f} s" for k, v in best["split"].items()))
        # The connector's own listing (its page sizes, joins and entity states), no Kafka: how much of
        # the producer's time is MLflow reading as the connector does it.
        from connector.config import parse
        from connector.mlflow.listing import full_listing
        from connector.mlflow.reader import MlflowReader, reader_settings

        cfg = parse(b.config("listing")[1])
        reader = MlflowReader(reader_settings(cfg))
        t0, w0 = time.time(), time.perf_counter()
        entities = sum(1 for _ in full_listing(reader))
        listing = time.perf_counter() - w0
        b.server.access.settle()  # type: ignore[union-attr]
        listing_requests = len(b.requests(t0, time.time()))
        figures.update({"connector_listing_seconds": listing, "connector_listing_requests": listing_requests,
                        "connector_listing_entities": entities})
        say(f"    the connector's own listing (connector.mlflow.listing.full_listing, page size "
            f"{cfg.producer.page_size}, no Kafka): {listing:.2f} s, {listing_requests} requests, {entities} entities")
    else:
        say("    (--repeat-floor 0: the floor as a command only, no in-process rounds or warm-up)")
    # The same read as a fresh process: Python start-up and importing MLflow included, as for (c).
    t0, cpu0, w0, busy0 = time.monotonic(), b.server_cpu_seconds(), time.time(), b.machine_busy_seconds()
    out = subprocess.run([sys.executable, ENTRY_POINT, "--floor-only", b.uri], capture_output=True, text=True,
                         cwd=REPO, check=True)
    process_wall = time.monotonic() - t0
    busy = b.machine_busy_seconds() - busy0
    process_server_cpu = b.server_cpu_seconds() - cpu0
    b.server.access.settle()  # type: ignore[union-attr]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    inner = result["seconds"]
    figures.update({"process_wall_seconds": process_wall, "process_read_seconds": inner,
                    "process_server_cpu_seconds": process_server_cpu, "process_machine_busy_seconds": busy,
                    "process_requests": len(b.requests(w0, time.time()))})
    figures.setdefault("seconds", inner)
    figures.setdefault("server_cpu_seconds", process_server_cpu)
    figures.setdefault("objects", {k: result[k] for k in ("experiments", "runs", "registered_models",
                                                          "model_versions")})
    b.record("b", figures)
    say(f"    as a fresh process (python start + imports + read): {process_wall:.2f} s wall, read {inner:.2f} s, "
        f"MLflow's server {process_server_cpu:.2f} s of CPU, objects {figures['objects']}; the machine busy "
        f"{busy:.1f} s of CPU")
