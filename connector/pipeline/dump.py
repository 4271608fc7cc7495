"""The MCP topic's contents, decoded, in the JSON format of DataHub's `file` sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.ingestion.sink.file import write_metadata_file
from datahub.metadata.schema_classes import MetadataChangeProposalClass

from connector.config import ConnectorConfig
from connector.kafka.clients import KafkaConnection
from connector.kafka.mcp_serde import McpDeserializer
from connector.kafka.reading import read_committed


def read_mcps(cfg: ConnectorConfig) -> Iterator[tuple[str, MetadataChangeProposalClass]]:
    """(record key, MCP) of every committed record on the MCP topic, in topic order."""
    connection = KafkaConnection(cfg.kafka)
    deserialize = McpDeserializer(connection.schema_registry(), cfg.kafka.topics.mcp)
    for msg in read_committed(connection, cfg.kafka.topics.mcp, role="dump", settled=False):
        if msg.value() is not None:
            yield msg.key().decode(), deserialize(msg.value())


def as_wrapper(mcp: MetadataChangeProposalClass) -> MetadataChangeProposalWrapper | MetadataChangeProposalClass:
    return MetadataChangeProposalWrapper.try_from_mcpc(mcp) or mcp


def dump(cfg: ConnectorConfig, out: Path) -> int:
    records = [as_wrapper(mcp) for _, mcp in read_mcps(cfg)]
    write_metadata_file(out, records)
    return len(records)
