"""The producer's records belong to their change topic and MLflow; the producer role's group settings."""

from __future__ import annotations

from connector.config import parse
from connector.kafka.membership import membership_settings
from connector.pipeline.position import (
    Position,
    identity,
    identity_mismatch,
    known_key,
    known_prefix,
    legacy_position_key,
    position_key,
    producer_id,
    role_key,
)


def _cfg(changes: str = "mlflow.changes", pipeline: str | None = None) -> object:
    data: dict[str, object] = {"source": {"type": "mlflow", "config": {"tracking_uri": "http://mlflow:5000"}},
                               "kafka": {"topics": {"changes": changes}}}
    if pipeline is not None:
        data["pipeline_name"] = pipeline
    return parse(data)


def test_records_of_two_change_topics_never_share_a_key_or_prefix() -> None:
    one, two = _cfg("team-a.changes"), _cfg("team-a.changes.v2")
    assert position_key(one) != position_key(two)
    assert role_key(one) != role_key(two)
    # a summary of one topic never starts with the other's prefix, whatever the entity key
    assert not known_key(two, "run:1").startswith(known_prefix(one))
    assert not known_key(one, "model_version:a:b/1").startswith(known_prefix(two))
    assert producer_id(one) != producer_id(two)


def test_new_keys_never_match_what_earlier_versions_wrote() -> None:
    # Earlier versions: `position:<pipeline>` and `known:<pipeline>:`, even for a pipeline named like a topic.
    cfg = _cfg("mlflow.changes", pipeline="mlflow.changes")
    assert legacy_position_key(cfg) == b"position:mlflow.changes"
    assert position_key(cfg) != legacy_position_key(cfg)
    assert not b"known:mlflow.changes:run:1".startswith(known_prefix(cfg))
    assert legacy_position_key(_cfg()) == b"position:mlflow-datahub"


def test_identity_ignores_credentials_and_a_trailing_slash() -> None:
    cfg = _cfg()
    ours = identity(cfg, "https://user:secret@mlflow.example.com/", "https://mlflow.example.com")
    assert ours == {"changes_topic": "mlflow.changes", "tracking_uri": "https://mlflow.example.com",
                    "registry_uri": "https://mlflow.example.com"}
    assert "secret" not in str(ours)
    assert identity_mismatch(dict(ours), ours) is None


def test_a_position_of_another_mlflow_or_topic_is_a_mismatch_and_says_which() -> None:
    cfg = _cfg()
    ours = identity(cfg, "http://mlflow-b:5000", "http://mlflow-b:5000")
    theirs = identity(cfg, "http://mlflow-a:5000", "http://mlflow-a:5000")
    why = identity_mismatch(theirs, ours)
    assert why is not None and "http://mlflow-a:5000" in why and "http://mlflow-b:5000" in why
    assert identity_mismatch({**ours, "changes_topic": "other.changes"}, ours) is not None
    assert identity_mismatch({**ours, "registry_uri": "http://registry:5000"}, ours) is not None
    # a position written before identities existed is taken as this topic's own (its key names the topic)
    assert identity_mismatch(None, ours) is None


def test_position_round_trips_its_identity_and_requests_offset() -> None:
    position = Position(3, 10, {"runs": 5}, 3, None, None, True, {"changes_topic": "t", "tracking_uri": "u",
                                                                  "registry_uri": "u"}, 42)
    assert Position.from_json(position.to_json()) == position
    old = Position.from_json(b'{"snapshot_seq": 2, "watermarks": {}}')  # as an earlier version wrote it
    assert old.identity is None and old.requests_offset is None and old.snapshot_seq == 2


def test_role_members_keep_the_partition_where_it_is_and_heartbeat_within_the_session() -> None:
    settings = membership_settings("pod-1", 10000)
    assert settings["partition.assignment.strategy"] == "cooperative-sticky"
    assert settings["client.id"] == "pod-1"
    assert settings["session.timeout.ms"] == 10000
    assert int(settings["heartbeat.interval.ms"]) * 3 <= 10000  # type: ignore[call-overload]
    assert settings["enable.auto.commit"] is False
