"""The producer's read-ahead of a listing (no I/O): items in order, a tick while the source is slow
(so that what was read can be published meanwhile), errors handed over, and the reading thread
ended when the caller stops early."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from connector.pipeline.producer import read_ahead


def slow(items: list[int], pause_after: int, pause: float) -> Iterator[int]:
    for i, item in enumerate(items):
        if i == pause_after:
            time.sleep(pause)
        yield item


def test_items_in_order_with_ticks_while_the_source_is_slow() -> None:
    out = list(read_ahead(slow(list(range(50)), pause_after=20, pause=0.5), idle_seconds=0.05))
    assert [x for x in out if x is not None] == list(range(50))
    ticks = [i for i, x in enumerate(out) if x is None]
    assert len(ticks) >= 3  # about one per 50 ms of the pause
    assert out[ticks[0] - 1] == 19 and out[ticks[-1] + 1] == 20  # all of them in the pause


def test_an_error_of_the_reading_reaches_the_caller_after_what_was_read() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("MLflow went away")

    got: list[int | None] = []
    with pytest.raises(RuntimeError, match="MLflow went away"):
        for item in read_ahead(failing()):
            got.append(item)
    assert [x for x in got if x is not None] == [1, 2]


def test_a_caller_that_stops_early_ends_the_reading_thread() -> None:
    produced: list[int] = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    items = read_ahead(endless(), buffer=10)
    assert next(items) == 0
    items.close()  # the caller is done
    assert threading.active_count() == before
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count  # nothing is read any more
    assert count <= 10 + 2  # never more than the buffer ahead
