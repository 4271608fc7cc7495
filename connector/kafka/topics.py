"""Kafka topics of the connector: created on start-up with the settings that make replay and
stale-entity removal hold (see docs/operations.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from connector.config import ConnectorConfig
from connector.errors import ConfigError
from connector.kafka.clients import KafkaConnection

log = logging.getLogger("connector.topics")

WEEK_MS = 7 * 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
# Largest change event: DataHub's GMS takes aspects up to 16 MB, so an event that big still maps.
CHANGE_EVENT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def specs(cfg: ConnectorConfig) -> list[TopicSpec]:
    k = cfg.kafka
    t = k.topics
    compact = {"cleanup.policy": "compact"}
    return [
        # Compacted: the latest event of every entity survives forever, so a replay from the
        # beginning rebuilds every entity; a week of full history is kept before compaction, so
        # a replay from a timestamp within the week sees every change after it.
        # A run with thousands of params is a change event of several MB: the topic takes up to
        # CHANGE_EVENT_MAX_BYTES (the broker's default is 1 MB).
        TopicSpec(t.changes, k.partitions, {**compact, "min.compaction.lag.ms": str(WEEK_MS),
                                            "max.message.bytes": str(CHANGE_EVENT_MAX_BYTES)}),
        # Co-partitioned with the change topic: partition p of the state holds the URNs that
        # events of change partition p made exist.
        TopicSpec(t.state, k.partitions, compact),
        # The producer's position and a summary per published entity, read whole at every start:
        # compacted within the hour (an uncompacted week of positions would be read at each start).
        TopicSpec(t.producer_offsets, 1, {**compact, "segment.ms": str(HOUR_MS), "min.cleanable.dirty.ratio": "0.1"}),
        TopicSpec(t.dead_letter, 1, {"cleanup.policy": "delete", "retention.ms": str(4 * WEEK_MS)}),
        TopicSpec(t.mcp, 1, {}),
    ] + ([
        # Webhook deliveries accepted by any instance, applied by the holder of the producer role.
        TopicSpec(t.webhook_requests, 1, {"cleanup.policy": "delete", "retention.ms": str(WEEK_MS)}),
    ] if cfg.webhooks is not None else [])


def admin(cfg: ConnectorConfig) -> AdminClient:
    return KafkaConnection(cfg.kafka).admin()


def partition_count(client: AdminClient, topic: str, timeout: float = 10.0) -> int:
    meta = client.list_topics(topic, timeout=timeout).topics[topic]
    if meta.error is not None:
        raise KafkaException(meta.error)
    return len(meta.partitions)


def _wait_for_leaders(client: AdminClient, names: list[str], timeout: float) -> None:
    """New topics answer reads only once every partition has a leader."""
    deadline = time.monotonic() + timeout
    while True:
        topics = client.list_topics(timeout=timeout).topics
        ready = all(name in topics and topics[name].error is None and topics[name].partitions
                    and all(p.leader >= 0 and p.error is None for p in topics[name].partitions.values())
                    for name in names)
        if ready or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def ensure_topics(cfg: ConnectorConfig, timeout: float = 15.0) -> dict[str, int]:
    """Create missing topics; check that the state topic is co-partitioned with the change topic.
    Returns the partition count of each topic. Raises ConfigError when the broker is unreachable or
    refuses the connection's security settings (it says which: authentication, mechanism, TLS)."""
    connection = KafkaConnection(cfg.kafka)
    try:
        client = connection.admin()
    except KafkaException as e:
        raise connection.refused_settings(e) from None
    existing = connection.cluster_metadata(client, timeout).topics
    missing = [s for s in specs(cfg) if s.name not in existing]
    if missing:
        futures = client.create_topics([
            NewTopic(s.name, num_partitions=s.partitions,
                     replication_factor=cfg.kafka.replication_factor, config=s.config)
            for s in missing
        ])
        for name, future in futures.items():
            try:
                future.result(timeout)
                log.info("created topic %s", name)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
    for warning in setting_warnings(client, cfg, timeout):
        log.warning("%s", warning)
    if missing:
        _wait_for_leaders(client, [s.name for s in missing], timeout)
    counts = {s.name: partition_count(client, s.name, timeout) for s in specs(cfg)}
    t = cfg.kafka.topics
    if counts[t.state] != counts[t.changes]:
        raise ConfigError(
            f"kafka.topics.state: {t.state} has {counts[t.state]} partitions but {t.changes} has "
            f"{counts[t.changes]}; the state topic must be co-partitioned with the change topic")
    return counts


def hazards(role: str, name: str, config: dict[str, str]) -> list[str]:
    """What in a topic's settings breaks replay (role "changes") or the consumer's and producer's
    memory (roles "state" and "producer_offsets"). Pure: settings in, one sentence per hazard out."""
    config = {"cleanup.policy": "delete", **config}  # the broker's default where the topic sets none
    policy = {p.strip() for p in config["cleanup.policy"].split(",")}
    retention = config.get("retention.ms", "604800000")
    out = []
    if role == "changes":
        if "compact" not in policy:
            out.append(f"topic {name}: cleanup.policy={config.get('cleanup.policy')} breaks replay: events older "
                       f"than retention.ms={retention} are deleted, so a replay from the beginning misses every "
                       "entity that did not change since (set cleanup.policy=compact)")
        elif "delete" in policy and retention != "-1":
            out.append(f"topic {name}: cleanup.policy={config.get('cleanup.policy')} with retention.ms={retention} "
                       "breaks replay: the latest event of an unchanged entity is deleted too "
                       "(set cleanup.policy=compact)")
        lag = config.get("min.compaction.lag.ms", "0")
        if "compact" in policy and lag.lstrip("-").isdigit() and int(lag) < WEEK_MS:
            out.append(f"topic {name}: min.compaction.lag.ms={lag} limits replay --from-timestamp: compaction may "
                       f"drop the history it needs after {int(lag) / 3600000:.1f} h (set {WEEK_MS} for a week)")
    elif "compact" not in policy or ("delete" in policy and retention != "-1"):
        what = "what the consumer wrote and which URNs exist" if role == "state" else "the producer's position"
        out.append(f"topic {name}: cleanup.policy={config.get('cleanup.policy')} with retention.ms={retention} "
                   f"loses {what} (set cleanup.policy=compact)")
    return out


def topic_configs(client: AdminClient, names: list[str], timeout: float = 15.0) -> dict[str, dict[str, str]]:
    """The current settings of topics (a topic that cannot be described is left out)."""
    out = {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    for resource, future in client.describe_configs(resources, request_timeout=timeout).items():
        try:
            entries = future.result()
        except KafkaException as e:
            log.debug("describe_configs %s: %s", resource.name, e)
            continue
        out[resource.name] = {k: str(v.value) for k, v in entries.items() if v.value is not None}
    return out


def setting_warnings(client: AdminClient, cfg: ConnectorConfig, timeout: float = 15.0) -> list[str]:
    """Hazards in the current settings of the change, state and producer-offsets topics (they may
    have been created by someone else, or changed since)."""
    t = cfg.kafka.topics
    roles = {t.changes: "changes", t.state: "state", t.producer_offsets: "producer_offsets"}
    out = []
    for name, config in topic_configs(client, list(roles), timeout).items():
        out += hazards(roles[name], name, config)
    return out
