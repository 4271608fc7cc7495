"""DataHub's MCP topic: proposals serialised exactly as DataHub's `DatahubKafkaEmitter` does.

Key: the entity URN as UTF-8. Value: Confluent wire format of DataHub's
`MetadataChangeProposal` Avro schema (subject `<topic>-value`), written by confluent-kafka's
`AvroSerializer` (registration, framing, fastavro) from the record the emitter's own conversion,
`mcp.to_obj(tuples=True)`, would give; the record itself is laid out by
`connector.datahub.aspects.envelope` (pure). This module is the registry I/O around it.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import MetadataChangeProposalClass, SystemMetadataClass
from datahub.metadata.schemas import getMetadataChangeProposalSchema

from connector.datahub.aspects import envelope, proposal, to_obj
from connector.errors import OperatorError
from connector.redaction import without_credentials


class RegistryUnavailable(Exception):
    """The schema registry did not answer, or refused the MCP schema: nothing can be written."""


class RegistryRefused(OperatorError):
    """The schema registry refused the credentials (HTTP 401) or access (HTTP 403): retrying cannot help."""


def refused(registry_url: str, error: SchemaRegistryError) -> RegistryRefused | None:
    status = getattr(error, "http_status_code", None)
    if status not in (401, 403):
        return None
    what = "the credentials" if status == 401 else "access"
    return RegistryRefused(f"kafka.schema_registry_config: the schema registry at {registry_url} refused {what} "
                           f"(HTTP {status}; basic.auth.user.info and basic.auth.credentials.source give them)")


class McpSerializer:
    def __init__(self, registry: SchemaRegistryClient, topic: str) -> None:
        self.topic = topic
        self.registry_url = without_credentials(registry._rest_client.base_urls[0])  # for messages
        client = registry
        self._avro = AvroSerializer(
            schema_str=getMetadataChangeProposalSchema(), schema_registry_client=client, to_dict=self._to_dict
        )
        self._ctx = SerializationContext(topic, MessageField.VALUE)
        # The last system metadata converted, and its conversion (a change event's proposals share one).
        self._metadata: tuple[SystemMetadataClass | None, dict | None] = (None, None)

    def _system_metadata(self, metadata: SystemMetadataClass | None) -> dict | None:
        if metadata is None:
            return None
        if self._metadata[0] is not metadata:
            self._metadata = (metadata, to_obj(metadata, tuples=True))
        return self._metadata[1]

    def _to_dict(self, mcp: MetadataChangeProposalWrapper | MetadataChangeProposalClass, ctx: Any) -> dict:
        if isinstance(mcp, MetadataChangeProposalWrapper):
            record = envelope(mcp, self._system_metadata(mcp.systemMetadata))
            if record is not None:
                return record
            return proposal(mcp).to_obj(tuples=True)
        return mcp.to_obj(tuples=True)

    @staticmethod
    def key(mcp: MetadataChangeProposalWrapper) -> bytes:
        return str(mcp.entityUrn).encode("utf-8")

    def value(self, mcp: MetadataChangeProposalWrapper | MetadataChangeProposalClass) -> bytes:
        """Confluent wire format; the schema is registered (once, then cached) on first use.
        Raises RegistryUnavailable when the registry cannot be reached or refuses the schema."""
        try:
            data = self._avro(mcp, self._ctx)
        except SerializationError:
            raise
        except SchemaRegistryError as e:
            error = refused(self.registry_url, e)
            if error is not None:
                raise error from None
            raise RegistryUnavailable(
                f"schema registry at {self.registry_url} refused subject {self.topic}-value: {e}") from e
        except Exception as e:  # the registry client's transport errors: refused, timeout, DNS
            raise RegistryUnavailable(
                f"schema registry at {self.registry_url} unreachable: {str(e).strip() or type(e).__name__}") from e
        assert data is not None
        return data


class McpDeserializer:
    """Reads the MCP topic back into `MetadataChangeProposalClass` objects."""

    def __init__(self, registry: SchemaRegistryClient, topic: str) -> None:
        self.registry_url = without_credentials(registry._rest_client.base_urls[0])  # for messages
        self._avro = AvroDeserializer(registry, schema_str=getMetadataChangeProposalSchema())
        self._ctx = SerializationContext(topic, MessageField.VALUE)

    def __call__(self, value: bytes) -> MetadataChangeProposalClass:
        try:
            record = self._avro(value, self._ctx)
        except SchemaRegistryError as e:
            error = refused(self.registry_url, e)
            if error is not None:
                raise error from None
            raise
        return MetadataChangeProposalClass.from_obj(record, tuples=True)
