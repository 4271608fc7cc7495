"""MLflow's page tokens are offsets: an object deleted while a listing runs shifts the next page by
one, and the object at the page boundary is never listed although it is alive. Such an object must
not be soft-deleted: each deletion candidate of a complete snapshot is read again by itself."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel

from connector.config import ConnectorConfig
from connector.contract import codec
from connector.datahub.mapping import MappingSettings, model_group_urn
from connector.devstack.mlflow_server import MlflowServer
from connector.mlflow.reader import MlflowReader, reader_settings
from tests.conftest import ConfigFactory, Kafka, read_to_end
from tests.integration.test_deletions import mcps, removals, snapshot_in_process

SETTINGS = MappingSettings()


class DeletesDuringListing(MlflowReader):
    """The real reader; once, after the first page of registered models, MLflow deletes some models
    of that page (as another user of MLflow would while the listing runs)."""

    def __init__(self, cfg: ConnectorConfig, client: MlflowClient, doomed: list[str]) -> None:
        super().__init__(reader_settings(cfg, retry_for_seconds=60))
        self.client, self.doomed = client, doomed

    def registered_models(self, *args: Any, **kwargs: Any) -> Iterator[list[RegisteredModel]]:
        for number, page in enumerate(super().registered_models(*args, **kwargs)):
            yield page
            if number == 0 and self.doomed and not kwargs.get("filter_string"):
                for name in self.doomed:
                    self.client.delete_registered_model(name)
                self.doomed = []


def test_objects_shifted_past_a_page_boundary_are_not_deleted(own_mlflow: MlflowServer, kafka: Kafka,
                                                              make_config: ConfigFactory,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(own_mlflow.uri, own_mlflow.uri)
    names = [f"paging race {n:02d}" for n in range(15)]
    for name in names:
        client.create_registered_model(name)
    # Pages of 5; models are listed by name: the first page is 00-04 (or other tests' models first).
    _, cfg = make_config(own_mlflow.uri, {"producer": {"page_size": 5},
                                          "source": {"config": {"stateful_ingestion": {
                                              "enabled": True, "fail_safe_threshold": 100}}}})
    assert snapshot_in_process(cfg, "paging-1").complete
    first_page = [m.name for m in client.search_registered_models(max_results=5)]
    doomed = first_page[1:3]
    shifted = [m.name for m in client.search_registered_models(max_results=7)][5:7]  # next page's first two

    caplog.set_level(logging.INFO)
    reader = DeletesDuringListing(cfg, client, doomed)
    summary = snapshot_in_process(cfg, "paging-2", reader)
    # The deleted models were read before they were deleted: seen by this snapshot, deleted by the next.
    assert summary.complete and summary.deletes == 0, summary
    assert "the listing missed 2 entities that MLflow still has" in caplog.text
    events = [codec.decode(m.value()) for m in read_to_end(kafka.bootstrap, cfg.kafka.topics.changes)]
    read_again = Counter(e["key"] for e in events if e["op"] == "READ")
    for name in shifted:  # read in both snapshots: in the second by the confirmation
        assert read_again[f"registered_model:{name}"] == 2, name
    groups = {model_group_urn(name, SETTINGS) for name in names}
    assert not [urn for urn in removals(mcps(kafka, cfg)) if urn in groups]

    summary = snapshot_in_process(cfg, "paging-3")
    assert summary.complete and summary.deletes == 2, summary
    events = [codec.decode(m.value()) for m in read_to_end(kafka.bootstrap, cfg.kafka.topics.changes)]
    assert sorted(e["key"] for e in events if e["op"] == "DELETE") == sorted(f"registered_model:{n}" for n in doomed)
    removed = removals(mcps(kafka, cfg))
    assert {urn for urn in removed if urn in groups} == {model_group_urn(name, SETTINGS) for name in doomed}
