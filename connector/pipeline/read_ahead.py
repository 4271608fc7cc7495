"""Reading ahead of the caller: a listing read in a thread of its own while the caller works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def read_ahead(items: Iterator[T], idle_seconds: float = 0.1, buffer: int = 2000) -> Iterator[T | None]:
    """The items of `items`, read in a thread of their own (at most `buffer` ahead), and None each
    time no item came for `idle_seconds`: the caller can use MLflow's think time. An exception of
    the reading ends the iteration with it; closing the iteration ends the reading."""
    ahead: queue.Queue[tuple[str, object]] = queue.Queue(buffer)
    done = threading.Event()

    def put(entry: tuple[str, object]) -> bool:
        while not done.is_set():
            try:
                ahead.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the caller's thread
            put(("error", e))

    reader = threading.Thread(target=read, name="mlflow-listing", daemon=True)
    reader.start()
    try:
        while True:
            try:
                what, value = ahead.get(timeout=idle_seconds)
            except queue.Empty:
                yield None
                continue
            if what == "item":
                yield value  # type: ignore[misc]
            elif what == "end":
                return
            else:
                raise value  # type: ignore[misc]
    finally:
        done.set()
        reader.join(30)
