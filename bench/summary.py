"""The summary: each part's figures against the targets of issues 4 and 13."""

from __future__ import annotations

import json
import os

from bench.common import Bench, say
from bench.scale_fixture import CACHE


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("MET " if ok else "MISS")


def summary(b: Bench) -> None:
    r = b.results
    say()
    say(f"== summary ({b.shape.name}: {b.shape.describe()})")
    a, bb, c, d, e, f, g, st, rs = (r.get(x) for x in "abcdefgsr")
    scale = int(b.shape.name.rsplit("x", 1)[1])
    latency = f" at {b.latency_ms:g} ms per request" if b.proxy is not None else " at 0 ms (no proxy)"
    if bb and c:
        # Like for like: (c) is the wall time of a command, so the floor is taken as a command too
        # (Python start and importing MLflow's client, which both pay); the in-process ratio is shown.
        limit = 2.0 if scale < 10 else 1.5
        ratio = c["seconds"] / bb["process_wall_seconds"]
        say(f"[{verdict(ratio <= limit)}] (c)/(b){latency} = {c['seconds']:.2f} / {bb['process_wall_seconds']:.2f} s"
            f" = {ratio:.2f}x, both as commands (target <= {limit:g}x at {b.shape.name}); against the floor's "
            f"reading alone, in-process ({bb['seconds']:.2f} s): {c['seconds'] / bb['seconds']:.2f}x")
    if c and c.get("without_signatures_seconds"):
        ratio = c["seconds"] / c["without_signatures_seconds"]
        ok = ratio <= 1.10 and c.get("snapshot_artifact_requests") == 0
        features = (f"; then its features pass read {c['features_versions']} signatures (once ever) in "
                    f"{c['features_seconds']:.2f} s" if c.get("features_seconds") is not None else "")
        say(f"[{verdict(ok)}] (c) snapshot / the same without reading signatures = {c['seconds']:.2f} / "
            f"{c['without_signatures_seconds']:.2f} s = {ratio:.2f}x, {c.get('snapshot_artifact_requests')} artifact "
            f"requests in the snapshot (target <= 1.10x, issue 19){features}")
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
        say(f"[{verdict(ratio >= 25)}] (a)/(c){latency} = {a['seconds']:.1f} / {c['seconds']:.2f} s = {ratio:.1f}x "
            f"faster (target >= 25x{floor})")
    elif c and not a and scale > 10:
        say(f"[{verdict(None)}] (a)/(c): the original is not run at {b.shape.name} (about an hour)")
    if d:
        poll = d["poll_interval"]
        reg, run = d["registry"], d["run"]
        ok = reg.get("p95") is not None and reg["p95"] < 0.5 and reg["arrived"] == reg["writes"]
        say(f"[{verdict(ok)}] (d) registry change p95 {reg.get('p95', float('nan')):.2f} s ({reg['mode']}; "
            f"target < 0.5 s with webhooks)")
        ok = run.get("p95") is not None and run["p95"] < poll + 0.5 and run["arrived"] == run["writes"]
        say(f"[{verdict(ok)}] (d) new run p95 {run.get('p95', float('nan')):.2f} s (target < poll interval + 0.5 = "
            f"{poll + 0.5:g} s)")
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
            ok = others[large] <= 5 and others[small] <= 5
            say(f"[{verdict(ok)}] (e) requests per idle cycle: {small} {others[small]:.1f}, {large} "
                f"{others[large]:.1f} (target: unchanged, 5 at x1 and x10)")
        else:
            say(f"[{verdict(None)}] (e) requests per idle cycle: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(others.items()))
                + " (run the other scale too: results are kept in .cache/bench/)")
    if e:
        artifacts = e["per_cycle_endpoints"].get("GET /model-versions/get-artifact", 0)
        say(f"[{verdict(artifacts == 0)}] (e) artifact requests per idle cycle: {artifacts:g} (target 0, issue 19)")
    if f:
        ratio = f["ratio_ours_vs_datahub_serialisation"]
        say(f"[{verdict(ratio >= 1.5)}] (f) ours / DataHub serialisation = {ratio:.2f} (target >= 1.5); "
            f"ours / DataHub incl. building = {f['ratio_ours_vs_datahub_build_and_serialise']:.2f}; "
            f"re-snapshot (deduplicated) / DataHub incl. building = "
            f"{f['ratio_resnapshot_vs_datahub_build_and_serialise']:.2f}")
    if g:
        worst = max(v for k, v in g.items() if k.endswith("_mb") and v)
        ok = worst < 500 if g["scale"] == "x10" else worst < 1024 if g["scale"] == "x100" else None
        say(f"[{verdict(ok)}] (g) peak RSS produce {g['produce_mb']:.0f} MB, consume {g['consume_mb']:.0f} MB"
            + (f", snapshot {g['snapshot_mb']:.0f} MB" if g.get("snapshot_mb") else "")
            + (f", run {g['run_mb']:.0f} MB" if g.get("run_mb") else "")
            + f" at {g['scale']} (target < 500 MB at x10, < 1 GB at x100)")
    if st:
        for command in ("snapshot", "run"):
            first = st.get(command, {}).get("first_request_median")
            page = st.get(command, {}).get("first_page_median")
            ok = None if first is None else first <= 1.0
            say(f"[{verdict(ok)}] (s) {command}: first MLflow request {first if first is None else round(first, 2)} s "
                f"after the command's start, the first page {page if page is None else round(page, 2)} s (median; "
                "target: first request <= 1 s)")
        bounds = st.get("bounds") or {}
        if bounds:
            say("       bounds: " + ", ".join(f"{k.replace('_', ' ')} {'?' if v is None else f'{v:.2f} s'}"
                                          for k, v in bounds.items()))
    if c and c.get("processes_mb") and b.shape.name == "x100":
        worst = max(c["processes_mb"])
        say(f"[{verdict(worst < 1024)}] (c) peak RSS of each process of `snapshot` at x100: "
            f"{', '.join(f'{m:.0f}' for m in c['processes_mb'])} MB (target < 1 GB each)")
    if rs:
        h = rs["history"]
        one, many = rs["ready_after_1_median"], rs["ready_after_history_median"]
        ok = many <= 5.0 if rs["scale"] == "x10" else None
        say(f"[{verdict(ok)}] (r) restart at {rs['scale']}: first cycle begins {one:.2f} s after 1 snapshot, "
            f"{many:.2f} s after {h} (target <= 5 s after 200 at x10)")
