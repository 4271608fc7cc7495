"""How the reader pages through a search (`MlflowReader._pages`), against an in-memory search that pages by
offset as MLflow's does: every object once, in order, in pages of the sizes asked for."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.store.entities.paged_list import PagedList

from connector.mlflow.reader import RUNS_MAX_PAGE, MlflowReader, ReaderSettings


class OffsetSearch:
    """`total` objects, paged as MLflow pages them: the token is the next offset."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sizes: list[int] = []  # max_results of each request

    def __call__(self, page_token: str | None = None, max_results: int = 0, **_: Any) -> PagedList:
        self.sizes.append(max_results)
        start = int(page_token or 0)
        end = min(start + max_results, self.total)
        return PagedList(list(range(start, end)), str(end) if end < self.total else None)


def _read(total: int, **kwargs: Any) -> tuple[list[int], list[int]]:
    reader = MlflowReader(ReaderSettings("http://127.0.0.1:9", "http://127.0.0.1:9"))
    search = OffsetSearch(total)
    items = [item for page in reader._pages("search_runs", search, **kwargs) for item in page]
    return items, search.sizes


@pytest.mark.parametrize("prefetch", [False, True])
def test_pages_of_a_fixed_size_after_a_small_first_one(prefetch: bool) -> None:
    items, sizes = _read(2_300, max_results=500, first_page=200, prefetch=prefetch)
    assert items == list(range(2_300))
    assert sizes == [200, 500, 500, 500, 500, 500]


def test_a_listing_s_pages_grow_to_their_cap() -> None:
    items, sizes = _read(60_000, max_results=500, first_page=200, prefetch=True, grow_to=10_000)
    assert items == list(range(60_000))  # every object once, in order, whatever the page sizes
    assert sizes == [200, 500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000, 10_000, 10_000]


def test_a_cap_below_the_page_size_leaves_the_page_size() -> None:
    _, sizes = _read(1_600, max_results=500, grow_to=100)
    assert sizes == [500, 500, 500, 500]


def test_run_listings_grow_their_pages_and_cycles_do_not() -> None:
    """`runs(prefetch=True)` is a snapshot's listing: its pages grow to `listing_page_size` (and never past
    MLflow's cap); the newest-first reads of a cycle keep `page_size`."""
    asked: list[dict[str, Any]] = []
    reader = MlflowReader(ReaderSettings("http://127.0.0.1:9", "http://127.0.0.1:9", listing_page_size=90_000))

    def pages(*_: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return iter(())

    reader._pages = pages  # type: ignore[method-assign]
    list(reader.runs(["1"], prefetch=True))
    list(reader.runs(["1"], order_by=["attributes.start_time DESC"], first_page=250))
    assert [a["grow_to"] for a in asked] == [RUNS_MAX_PAGE, None]
    assert [a["max_results"] for a in asked] == [500, 500]
