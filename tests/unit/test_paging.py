"""How the reader pages through run searches (`MlflowReader.runs`), against an in-memory search that pages by
offset as MLflow's does: every run once, in order, and how many experiments each search covers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.store.entities.paged_list import PagedList

from connector.mlflow.reader import (
    LISTING_EXPERIMENTS_PER_SEARCH,
    RUNS_PER_EXPERIMENT_BATCH,
    MlflowReader,
    ReaderSettings,
)


class OffsetSearch:
    """`per_experiment` runs in each experiment, paged as MLflow pages them: the token is the next offset."""

    def __init__(self, per_experiment: int) -> None:
        self.per_experiment = per_experiment
        self.asked: list[tuple[int, int]] = []  # (experiments, max_results) of each request

    def __call__(self, experiment_ids: list[str], page_token: str | None = None, max_results: int = 0,
                 **_: Any) -> PagedList:
        self.asked.append((len(experiment_ids), max_results))
        runs = [(e, i) for e in experiment_ids for i in range(self.per_experiment)]
        start = int(page_token or 0)
        end = min(start + max_results, len(runs))
        return PagedList(runs[start:end], str(end) if end < len(runs) else None)


def _reader(search: OffsetSearch) -> MlflowReader:
    reader = MlflowReader(ReaderSettings("http://127.0.0.1:9", "http://127.0.0.1:9", page_size=500))
    reader.tracking = SimpleNamespace(search_runs=search)  # type: ignore[assignment]
    return reader


@pytest.mark.parametrize("experiments", [1, 99, 100, 101, 250, 1_001])
def test_a_listing_searches_a_hundred_experiments_at_a_time(experiments: int) -> None:
    search = OffsetSearch(per_experiment=7)
    ids = [str(i) for i in range(experiments)]
    runs = [run for page in _reader(search).runs(ids, first_page=200, prefetch=True) for run in page]
    assert runs == [(e, i) for e in ids for i in range(7)]  # every run once, in order
    searches = [n for n, size in search.asked if size == 200]  # each search begins with the small page
    assert sum(searches) == experiments
    assert max(searches) == min(experiments, LISTING_EXPERIMENTS_PER_SEARCH)
    assert {size for _, size in search.asked} <= {200, 500}


def test_other_reads_cover_up_to_a_thousand_experiments_per_search() -> None:
    """A cycle's newest-first read costs one request per thousand experiments, whatever their runs."""
    search = OffsetSearch(per_experiment=0)
    ids = [str(i) for i in range(2_500)]
    list(_reader(search).runs(ids, order_by=["attributes.start_time DESC"], first_page=250))
    assert [n for n, _ in search.asked] == [RUNS_PER_EXPERIMENT_BATCH, RUNS_PER_EXPERIMENT_BATCH, 500]
