"""The benchmark's MLflow content, and a real `mlflow server` to hold it.

Scale 1: 10 experiments x 200 runs (each with 10 params, 5 metrics, 3 tags, finished), 100
registered models x 5 versions, each version produced by its own run (so 500 of the 2,000 runs
have a model version), an alias and a stage on some versions. `--scale N` multiplies experiments
and models by N. `quick` is a small variant for iterating on the benchmark itself.

The store is built once per shape through the MLflow REST API (MlflowClient.create_run with its
tags, one log_batch with params and metrics, one update for the end state; a thread pool) and its
SQLite file is cached in .cache/bench/ so reruns start from a copy.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from connector.devstack.mlflow_server import MlflowServer  # noqa: E402  (the devstack's server, the tests' too)

CACHE = REPO / ".cache" / "bench"
FORMAT_VERSION = 1  # bump when the content below changes, so cached stores are rebuilt

EXPERIMENT_PREFIX = "bench/experiment-"
MODEL_PREFIX = "bench-model-"


@dataclass(frozen=True)
class Shape:
    name: str
    experiments: int
    runs_per_experiment: int
    models: int
    versions_per_model: int = 5
    params: int = 10
    metrics: int = 5
    tags: int = 3

    @property
    def runs(self) -> int:
        return self.experiments * self.runs_per_experiment

    @property
    def versions(self) -> int:
        return self.models * self.versions_per_model

    def describe(self) -> str:
        return (f"{self.experiments} experiments x {self.runs_per_experiment} runs = {self.runs} runs "
                f"({self.params} params, {self.metrics} metrics, {self.tags} tags each), "
                f"{self.models} registered models x {self.versions_per_model} versions = {self.versions} versions")


def shape(scale: int = 1, quick: bool = False) -> Shape:
    if quick:
        return Shape(f"quick-x{scale}", experiments=2 * scale, runs_per_experiment=50, models=10 * scale)
    return Shape(f"x{scale}", experiments=10 * scale, runs_per_experiment=200, models=100 * scale)


# -- the server -----------------------------------------------------------------------------------


class AccessLog:
    """Follows the server's log and stamps each request line (uvicorn writes one per request) with
    the time it was read, so requests can be counted between two instants and grouped in bursts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[float, str]] = []  # (time.time() when seen, request line)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, name="access-log", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            pending = b""
            while not self._stop.is_set():
                chunk = f.read()
                if not chunk:
                    time.sleep(0.02)
                    continue
                now = time.time()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                found = [(now, line.decode(errors="replace")) for line in lines if b'HTTP/1.1" ' in line]
                with self._lock:
                    self.requests.extend(found)

    def between(self, start: float, end: float, exclude: tuple[str, ...] = ("/health",)) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, line) for t, line in self.requests
                    if start <= t < end and not any(x in line for x in exclude)]

    def settle(self, quiet: float = 0.3) -> None:
        """Wait until the log has been read up to now (a request answered is logged just before)."""
        time.sleep(quiet)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class BenchServer(MlflowServer):
    """The `mlflow server` of connector.devstack.mlflow_server (loopback, SQLite store; the tests' too),
    with unbuffered output so that the access log can be followed as requests happen, and webhooks
    allowed to the connector's receiver on loopback over plain HTTP (part d)."""

    def __init__(self, workdir: Path, db: Path | None = None, workers: int = 1) -> None:
        if db is not None and (workdir / "mlflow.db").exists():
            (workdir / "mlflow.db").unlink()  # a fresh copy of the store each time
        super().__init__(workdir, db, workers=workers, env={
            "PYTHONUNBUFFERED": "1",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"})
        self.access: AccessLog | None = None

    def start(self, timeout: float = 180.0) -> BenchServer:
        self.log_path.touch()
        self.access = AccessLog(self.log_path)
        super().start(timeout)
        return self

    def stop(self) -> None:
        if self.access is not None:
            self.access.close()
            self.access = None
        super().stop()

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the content ----------------------------------------------------------------------------------


T = TypeVar("T")


def _parallel(fn: Callable[[int], T], items: Iterable[int], threads: int,
              each_done: Callable[[int], None] | None = None) -> list[T]:
    """fn over items on a thread pool, in order; the first failure (or Ctrl-C) cancels the rest."""
    pool = ThreadPoolExecutor(threads)
    try:
        futures = [pool.submit(fn, i) for i in items]
        out = []
        for n, future in enumerate(futures, 1):
            out.append(future.result())
            if each_done:
                each_done(n)
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def build(uri: str, s: Shape, threads: int = 8, progress: Callable[[str], None] = print) -> None:
    """Create the content of shape `s` on an empty MLflow server."""
    import logging

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per run
    client = MlflowClient(uri)
    rng = random.Random(42)
    started = time.monotonic()
    experiment_ids = [
        client.create_experiment(f"{EXPERIMENT_PREFIX}{e:04d}",
                                 tags={"team": f"team-{e % 7}", "mlflow.note.content": f"benchmark experiment {e}"})
        for e in range(s.experiments)
    ]
    base_ms = 1_790_000_000_000

    def make_run(index: int) -> str:
        e, r = divmod(index, s.runs_per_experiment)
        start = base_ms + index * 1000
        run = client.create_run(
            experiment_ids[e], start_time=start, run_name=f"run-{e:04d}-{r:04d}",
            tags={f"tag_{t}": f"value-{(index + t) % 11}" for t in range(s.tags)},
        )
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric(f"metric_{m}", rng.random(), start + 500, m) for m in range(s.metrics)],
            params=[Param(f"param_{p}", str((index * 31 + p) % 97)) for p in range(s.params)],
        )
        client.set_terminated(run_id, status="FAILED" if index % 50 == 7 else "FINISHED", end_time=start + 900)
        return run_id

    def each_done(done: int) -> None:
        if done % 1000 == 0:
            progress(f"  fixture: {done}/{s.runs} runs ({time.monotonic() - started:.0f} s)")

    run_ids = _parallel(make_run, range(s.runs), threads, each_done)

    runs_done = time.monotonic()
    # Versions come from runs spread over all experiments: version v of model m from its own run.
    stride = max(1, s.runs // max(1, s.versions))

    def make_model(m: int) -> None:
        name = f"{MODEL_PREFIX}{m:04d}"
        client.create_registered_model(name, tags={"domain": f"domain-{m % 5}"},
                                       description=f"benchmark model {m}")
        versions = []
        for v in range(s.versions_per_model):
            run_id = run_ids[((m * s.versions_per_model + v) * stride) % s.runs]
            mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                             tags={"origin": "benchmark"}, description=f"version {v + 1}")
            versions.append(mv.version)
        client.set_registered_model_alias(name, "champion", versions[-1])
        if m % 2 == 0:
            client.transition_model_version_stage(name, versions[-1], "Production")
        if m % 3 == 0:
            client.transition_model_version_stage(name, versions[-2], "Staging")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stages are deprecated in MLflow 3; still in use, still mapped
        _parallel(make_model, range(s.models), threads)
    progress(f"  fixture: {s.runs} runs in {runs_done - started:.0f} s")
    progress(f"  fixture: {s.runs} runs, {s.models} models, {s.versions} versions created in "
             f"{time.monotonic() - started:.0f} s")


# Copy k of a clone is dated k days before the base: a store ten times as large has grown over a
# longer time, not ten times as fast. (Undated copies would put ten copies of the base's last
# seconds in the same seconds, and the newest-first reads of an idle cycle, which read back the
# last `watermark_overlap_seconds`, would read ten times as much.)
CLONE_FORMAT = 2
COPY_AGE_MS = 86_400_000
TIMES = {"experiments": ("creation_time", "last_update_time"), "runs": ("start_time", "end_time", "deleted_time"),
         "metrics": ("timestamp",), "latest_metrics": ("timestamp",),
         "registered_models": ("creation_time", "last_updated_time"),
         "model_versions": ("creation_time", "last_updated_time")}


def clone(base_db: Path, base: Shape, copies: int, out: Path) -> None:
    """A store holding `copies` copies of the base store's content: copy k > 0 gets new run ids,
    renumbered experiments and models (experiment e -> e + k * experiments, model m -> m + k * models)
    and is dated k days earlier, written with plain SQL into MLflow's own tables (the same rows the
    REST API wrote for the base)."""
    import re
    import sqlite3
    import uuid

    tmp = out.with_suffix(".tmp")
    shutil.copy(base_db, tmp)
    con = sqlite3.connect(tmp)

    def rows(table: str) -> list[dict[str, object]]:
        cur = con.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    tables = ["experiments", "experiment_tags", "runs", "params", "metrics", "latest_metrics", "tags",
              "registered_models", "registered_model_tags", "registered_model_aliases", "model_versions",
              "model_version_tags"]
    content = {t: rows(t) for t in tables}
    for t, found in rows_in_other_tables(con, tables):
        raise RuntimeError(f"cannot clone {base_db}: table {t} has {found} rows the clone does not handle")
    experiment_ids = [int(r["experiment_id"]) for r in content["experiments"]  # type: ignore[call-overload]
                      if str(r["name"]).startswith(EXPERIMENT_PREFIX)]
    step = max(experiment_ids)
    run_name = re.compile(r"run-(\d{4})-(\d{4})")

    def copy(k: int) -> None:
        exp = {str(e): str(e + k * step) for e in experiment_ids}
        runs = {str(r["run_uuid"]): uuid.uuid4().hex for r in content["runs"]}

        def experiment_name(name: str) -> str:
            return f"{EXPERIMENT_PREFIX}{int(name.removeprefix(EXPERIMENT_PREFIX)) + k * base.experiments:04d}"

        def model_name(name: str) -> str:
            return f"{MODEL_PREFIX}{int(name.removeprefix(MODEL_PREFIX)) + k * base.models:04d}"

        def renamed_run(name: str) -> str:
            return run_name.sub(lambda m: f"run-{int(m[1]) + k * base.experiments:04d}-{m[2]}", name)

        def path(value: object, experiment: str | None, run: str | None) -> object:
            if not isinstance(value, str):
                return value
            if run is not None:
                value = value.replace(run, runs[run])
            if experiment is not None:
                value = re.sub(rf"/{experiment}(/|$)", lambda m: f"/{exp[experiment]}{m[1]}", value)
            return value

        def insert(table: str, new_rows: list[dict[str, object]]) -> None:
            if not new_rows:
                return
            age = k * COPY_AGE_MS
            new_rows = [{**r, **{c: r[c] - age for c in TIMES.get(table, ()) if isinstance(r.get(c), int)}}
                        for r in new_rows]
            names = list(new_rows[0])
            con.executemany(f'INSERT INTO "{table}" ({", ".join(names)}) VALUES ({", ".join("?" * len(names))})',
                            [tuple(r[n] for n in names) for r in new_rows])

        insert("experiments", [{**r, "experiment_id": int(exp[str(r["experiment_id"])]),
                                "name": experiment_name(str(r["name"])),
                                "artifact_location": path(r["artifact_location"], str(r["experiment_id"]), None)}
                               for r in content["experiments"] if str(r["experiment_id"]) in exp])
        insert("experiment_tags", [{**r, "experiment_id": int(exp[str(r["experiment_id"])])}
                                   for r in content["experiment_tags"] if str(r["experiment_id"]) in exp])
        insert("runs", [{**r, "run_uuid": runs[str(r["run_uuid"])],
                         "experiment_id": int(exp[str(r["experiment_id"])]),
                         "name": renamed_run(str(r["name"])),
                         "artifact_uri": path(r["artifact_uri"], str(r["experiment_id"]), str(r["run_uuid"]))}
                        for r in content["runs"]])
        for table in ("params", "metrics", "latest_metrics"):
            insert(table, [{**r, "run_uuid": runs[str(r["run_uuid"])]} for r in content[table]])
        insert("tags", [{**r, "run_uuid": runs[str(r["run_uuid"])],
                         "value": renamed_run(str(r["value"])) if r["key"] == "mlflow.runName" else r["value"]}
                        for r in content["tags"]])
        for table in ("registered_models", "registered_model_tags", "registered_model_aliases", "model_version_tags"):
            insert(table, [{**r, "name": model_name(str(r["name"]))} for r in content[table]])
        insert("model_versions", [
            {**r, "name": model_name(str(r["name"])), "run_id": runs.get(str(r["run_id"]), r["run_id"]),
             **{c: path(r[c], None, str(r["run_id"]) if r["run_id"] in runs else None)
                for c in ("source", "run_link", "storage_location")}}
            for r in content["model_versions"]])

    for k in range(1, copies):
        copy(k)
    con.commit()
    con.close()
    tmp.replace(out)


def rows_in_other_tables(con: object, handled: list[str]) -> list[tuple[str, int]]:
    import sqlite3

    assert isinstance(con, sqlite3.Connection)
    ignored = set(handled) | {"alembic_version", "workspaces"}
    found = []
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        if table not in ignored:
            n = con.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
            if n:
                found.append((table, n))
    return found


def cached_store(s: Shape, workdir: Path, progress: Callable[[str], None] = print, threads: int = 8,
                 method: str = "clone") -> Path:
    """The SQLite store of shape `s`: from .cache/bench/, or made now and cached. Scale 1 is built
    through MLflow's REST API; larger scales clone it (method "clone", seconds) or are built
    through the API as well (method "api": about 20 minutes for x10 on an idle 2-core machine)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    scale = s.experiments // shape(1, s.name.startswith("quick")).experiments
    built_by = "-api" if scale > 1 and method == "api" else ""
    cloned = f".{CLONE_FORMAT}" if scale > 1 and method == "clone" else ""
    cached = CACHE / f"mlflow-{s.name}{built_by}-v{FORMAT_VERSION}{cloned}.db"
    if cached.exists():
        progress(f"fixture {s.name}: cached store {cached.relative_to(REPO)}")
        return cached
    if scale > 1 and method == "clone":
        base = shape(1, s.name.startswith("quick"))
        base_db = cached_store(base, workdir, progress, threads, method)
        started = time.monotonic()
        clone(base_db, base, scale, cached)
        progress(f"fixture {s.name}: {scale} copies of {base.name} ({time.monotonic() - started:.0f} s) -> "
                 f"{cached.relative_to(REPO)}")
        return cached
    progress(f"fixture {s.name}: building {s.describe()}")
    server = BenchServer(workdir / f"build-{s.name}", workers=4)
    try:
        server.start()
        build(server.uri, s, threads=threads, progress=progress)
    finally:
        server.stop()
    tmp = cached.with_suffix(".tmp")
    shutil.copy(server.db, tmp)
    tmp.replace(cached)
    shutil.rmtree(server.workdir, ignore_errors=True)
    return cached
