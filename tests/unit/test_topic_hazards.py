"""Topic settings (connector/kafka/topics.py): the topics the connector creates (`specs`) and what in a
topic's settings breaks replay or the connector's memory (`hazards`). Pure: no broker is contacted."""

from __future__ import annotations

from typing import Any

import pytest

from connector.config import ConnectorConfig, parse
from connector.kafka.topics import CHANGE_EVENT_MAX_BYTES, WEEK_MS, hazards, specs

WEEK = str(WEEK_MS)
GOOD_CHANGES = {"cleanup.policy": "compact", "min.compaction.lag.ms": WEEK}


def config(kafka: dict[str, Any] | None = None) -> ConnectorConfig:
    return parse({"source": {"type": "mlflow", "config": {"tracking_uri": "http://x"}},
                  "kafka": {"bootstrap_servers": "broker.invalid:9092",
                            "schema_registry_url": "http://registry.invalid:8081", **(kafka or {})}})


def roles(cfg: ConnectorConfig) -> dict[str, str]:
    t = cfg.kafka.topics
    return {t.changes: "changes", t.state: "state", t.producer_offsets: "producer_offsets"}


# ---- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kafka", [
    {},
    {"partitions": 7, "topics": {"changes": "c", "state": "s", "producer_offsets": "p", "dead_letter": "d",
                                 "mcp": "MetadataChangeProposal_v1_custom"}},
], ids=["defaults", "own names"])
def test_the_topics_the_connector_creates_have_no_hazard(kafka: dict[str, Any]) -> None:
    cfg = config(kafka)
    by_name = {s.name: s for s in specs(cfg)}
    checked = roles(cfg)
    assert set(checked) <= set(by_name)
    for name, role in checked.items():
        assert hazards(role, name, by_name[name].config) == [], name


def test_specs_name_every_topic_of_the_configuration() -> None:
    cfg = config({"partitions": 7, "topics": {"changes": "c", "state": "s", "producer_offsets": "p",
                                              "dead_letter": "d", "mcp": "m"}})
    assert [(s.name, s.partitions) for s in specs(cfg)] == [("c", 7), ("s", 7), ("p", 1), ("d", 1), ("m", 1)]


def test_default_topic_names_and_partitions() -> None:
    cfg = config()
    assert [(s.name, s.partitions) for s in specs(cfg)] == [
        ("mlflow.changes", 3), ("mlflow.state", 3), ("mlflow.producer-offsets", 1), ("mlflow.changes.dlq", 1),
        ("MetadataChangeProposal_v1", 1)]


def test_change_topic_is_compacted_keeps_a_week_and_takes_large_events() -> None:
    changes = specs(config())[0]
    assert changes.config == {"cleanup.policy": "compact", "min.compaction.lag.ms": WEEK,
                              "max.message.bytes": str(CHANGE_EVENT_MAX_BYTES)}
    assert WEEK_MS == 604_800_000
    assert CHANGE_EVENT_MAX_BYTES == 16 * 1024 * 1024


def test_state_and_position_are_compacted_dead_letters_expire_and_the_mcp_topic_is_left_to_the_broker() -> None:
    _, state, offsets, dead_letter, mcp = specs(config())
    assert state.config == {"cleanup.policy": "compact"}
    assert offsets.config == {"cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.1"}
    assert dead_letter.config == {"cleanup.policy": "delete", "retention.ms": str(4 * WEEK_MS)}
    assert mcp.config == {}


def test_state_topic_is_co_partitioned_with_the_change_topic() -> None:
    for partitions in (1, 5, 12):
        changes, state, *_ = specs(config({"partitions": partitions}))
        assert changes.partitions == state.partitions == partitions


# ---- hazards of the change topic ----------------------------------------------------------------


def test_delete_policy_on_the_change_topic_breaks_replay() -> None:
    out = hazards("changes", "mlflow.changes", {"cleanup.policy": "delete", "retention.ms": "86400000"})
    assert len(out) == 1
    assert out[0].startswith("topic mlflow.changes: cleanup.policy=delete breaks replay")
    assert "retention.ms=86400000" in out[0] and "set cleanup.policy=compact" in out[0]


def test_delete_policy_without_retention_names_the_brokers_default_week() -> None:
    out = hazards("changes", "c", {"cleanup.policy": "delete"})
    assert len(out) == 1 and "retention.ms=604800000" in out[0]


def test_compact_delete_with_finite_retention_breaks_replay() -> None:
    out = hazards("changes", "c", {"cleanup.policy": "compact,delete", "retention.ms": "3600000",
                                   "min.compaction.lag.ms": WEEK})
    assert out == ["topic c: cleanup.policy=compact,delete with retention.ms=3600000 breaks replay: the latest "
                   "event of an unchanged entity is deleted too (set cleanup.policy=compact)"]


def test_compact_delete_without_retention_uses_the_default_week_and_breaks_replay() -> None:
    out = hazards("changes", "c", {"cleanup.policy": "compact,delete", "min.compaction.lag.ms": WEEK})
    assert len(out) == 1 and "retention.ms=604800000" in out[0]


@pytest.mark.parametrize("policy", ["compact,delete", "delete,compact", " compact , delete "])
def test_compact_delete_with_unlimited_retention_is_fine(policy: str) -> None:
    assert hazards("changes", "c", {"cleanup.policy": policy, "retention.ms": "-1",
                                    "min.compaction.lag.ms": WEEK}) == []


@pytest.mark.parametrize("lag, hours", [("0", "0.0"), ("3600000", "1.0"), (str(WEEK_MS - 1), "168.0")])
def test_a_compaction_lag_below_a_week_is_named(lag: str, hours: str) -> None:
    out = hazards("changes", "c", {"cleanup.policy": "compact", "min.compaction.lag.ms": lag})
    assert out == [f"topic c: min.compaction.lag.ms={lag} limits replay --from-timestamp: compaction may drop the "
                   f"history it needs after {hours} h (set {WEEK_MS} for a week)"]


def test_a_compacted_change_topic_without_a_lag_has_the_brokers_default_of_zero() -> None:
    out = hazards("changes", "c", {"cleanup.policy": "compact"})
    assert len(out) == 1 and "min.compaction.lag.ms=0 " in out[0]


@pytest.mark.parametrize("lag", [WEEK, str(30 * WEEK_MS)])
def test_a_compaction_lag_of_a_week_or_more_is_fine(lag: str) -> None:
    assert hazards("changes", "c", {"cleanup.policy": "compact", "min.compaction.lag.ms": lag}) == []


def test_a_short_lag_and_a_finite_retention_are_both_named() -> None:
    out = hazards("changes", "c", {"cleanup.policy": "compact,delete", "retention.ms": "3600000",
                                   "min.compaction.lag.ms": "60000"})
    assert len(out) == 2
    assert "retention.ms=3600000" in out[0] and "min.compaction.lag.ms=60000" in out[1]


def test_the_lag_is_not_named_on_a_topic_that_does_not_compact() -> None:
    """With delete alone the policy is the hazard; a lag is meaningless there."""
    out = hazards("changes", "c", {"cleanup.policy": "delete", "min.compaction.lag.ms": "0"})
    assert len(out) == 1 and "min.compaction.lag.ms" not in out[0]


# ---- hazards of the state and producer-offsets topics -------------------------------------------


@pytest.mark.parametrize("role", ["state", "producer_offsets"])
@pytest.mark.parametrize("settings", [
    {"cleanup.policy": "compact"},
    {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},  # no replay from a timestamp: no lag needed
    {"cleanup.policy": "compact,delete", "retention.ms": "-1"},
])
def test_compacted_state_and_position_are_fine(role: str, settings: dict[str, str]) -> None:
    assert hazards(role, "t", settings) == []


@pytest.mark.parametrize("role, what", [("state", "what the consumer wrote and which URNs exist"),
                                        ("producer_offsets", "the producer's position")])
def test_delete_policy_on_state_or_position_is_named(role: str, what: str) -> None:
    out = hazards(role, "t", {"cleanup.policy": "delete", "retention.ms": "86400000"})
    assert out == [f"topic t: cleanup.policy=delete with retention.ms=86400000 loses {what} "
                   "(set cleanup.policy=compact)"]


@pytest.mark.parametrize("role", ["state", "producer_offsets"])
def test_compact_delete_with_finite_retention_on_state_or_position_is_named(role: str) -> None:
    out = hazards(role, "t", {"cleanup.policy": "compact,delete", "retention.ms": "3600000"})
    assert len(out) == 1 and "retention.ms=3600000 loses" in out[0]


@pytest.mark.parametrize("role", ["state", "producer_offsets"])
def test_state_or_position_without_a_policy_has_the_brokers_default_delete(role: str) -> None:
    assert len(hazards(role, "t", {})) == 1


def test_a_missing_policy_is_named_as_the_default_it_stands_for() -> None:
    out = hazards("changes", "c", {})
    assert len(out) == 1 and "cleanup.policy=delete" in out[0]
