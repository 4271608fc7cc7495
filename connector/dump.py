"""The MCP topic's contents, decoded, in the JSON format of DataHub's `file` sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.ingestion.sink.file import write_metadata_file
from datahub.metadata.schema_classes import MetadataChangeProposalClass

from connector.config import ConnectorConfig
from connector.mcp_topic import McpDeserializer
from connector.producer import read_to_end


def read_mcps(cfg: ConnectorConfig) -> Iterator[tuple[str, MetadataChangeProposalClass]]:
    """(record key, MCP) of every committed record on the MCP topic, in topic order."""
    k = cfg.kafka
    deserialize = McpDeserializer(k.resolved_schema_registry(), k.schema_registry_config, k.topics.mcp)
    for msg in read_to_end(k.resolved_bootstrap(), k.topics.mcp):
        if msg.value() is not None:
            yield msg.key().decode(), deserialize(msg.value())


def as_wrapper(mcp: MetadataChangeProposalClass) -> MetadataChangeProposalWrapper | MetadataChangeProposalClass:
    return MetadataChangeProposalWrapper.try_from_mcpc(mcp) or mcp


def dump(cfg: ConnectorConfig, out: Path) -> int:
    records = [as_wrapper(mcp) for _, mcp in read_mcps(cfg)]
    write_metadata_file(out, records)
    return len(records)
