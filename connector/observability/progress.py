"""Progress of a long snapshot: on a terminal a live display (objects read by kind, of the total where
MLflow tells it, the rate, time left where the totals allow); in logs one line every 10 s.

MLflow tells how many experiments, registered models and model versions there are (the listing reads
them whole before the runs); it never tells how many runs: those are counted, with their rate."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from connector.observability.metrics import METRICS

log = logging.getLogger("connector.producer")

LABELS = {"EXPERIMENT": "experiments", "REGISTERED_MODEL": "registered models", "MODEL_VERSION": "model versions",
          "RUN": "runs", "LOGGED_MODEL": "logged models"}


class SnapshotProgress:
    def __init__(self, snapshot_id: str, live: bool | None = None, every_seconds: float = 10.0,
                 clock: Any = time.monotonic) -> None:
        self.snapshot_id = snapshot_id
        self.clock = clock
        self.started = clock()
        self.every = every_seconds
        self.read: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self._last_line = self.started
        self._lock = threading.Lock()
        self._live = sys.stderr.isatty() if live is None else live
        self._display: Any = None
        self._tasks: dict[str, Any] = {}
        METRICS.snapshot_running.set(1)
        METRICS.snapshot_objects_read.set(0)

    # -- what the listing says ------------------------------------------------------------------------

    def total(self, kind: str, count: int) -> None:
        with self._lock:
            self.totals[kind] = count
        if self._display is not None and kind in self._tasks:
            self._display.update(self._tasks[kind], total=count)

    def advance(self, kind: str) -> None:
        with self._lock:
            self.read[kind] = self.read.get(kind, 0) + 1
            objects = sum(self.read.values())
        METRICS.snapshot_objects_read.set(objects)
        if self._live:
            self._show(kind)
        now = self.clock()
        if now - self._last_line >= self.every:
            self._last_line = now
            log.info("%s", self.line())

    # -- what people see ------------------------------------------------------------------------------

    def rate(self) -> float:
        seconds = max(self.clock() - self.started, 1e-6)
        return sum(self.read.values()) / seconds

    def seconds_left(self) -> float | None:
        """Only when every kind read so far has a known total (runs have none)."""
        with self._lock:
            if not self.read or any(kind not in self.totals for kind in self.read):
                return None
            remaining = sum(max(self.totals[k] - self.read.get(k, 0), 0) for k in self.totals)
        rate = self.rate()
        return remaining / rate if rate > 0 else None

    def line(self) -> str:
        with self._lock:
            parts = [f"{n}/{self.totals[k]} {LABELS.get(k, k)}" if k in self.totals else f"{n} {LABELS.get(k, k)}"
                     for k, n in self.read.items()]
        left = self.seconds_left()
        eta = f", about {left:.0f} s left" if left is not None else ""
        return (f"snapshot {self.snapshot_id}: {sum(self.read.values())} objects read ({', '.join(parts)}) in "
                f"{self.clock() - self.started:.0f} s, {self.rate():.0f}/s{eta}")

    def _show(self, kind: str) -> None:
        if self._display is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._display = Progress(TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._display.start()
        if kind not in self._tasks:
            self._tasks[kind] = self._display.add_task(LABELS.get(kind, kind), total=self.totals.get(kind))
        self._display.advance(self._tasks[kind])

    def close(self) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None
        METRICS.snapshot_running.set(0)
