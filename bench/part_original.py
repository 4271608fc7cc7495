"""(a) DataHub's own MLflow source: `datahub ingest` (file sink), a full ingest, run from DataHub's
environment (.cache/original-venv, `make bench` creates it; DATAHUB_ORIGINAL_VENV elsewhere)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from bench.common import Bench, endpoint_counts, say
from bench.processes import Child, tail
from bench.scale_fixture import REPO

ORIGINAL_VENV = Path(os.environ.get("DATAHUB_ORIGINAL_VENV") or REPO / ".cache" / "original-venv")


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
