"""DataHub's MCP topic: proposals serialised exactly as DataHub's `DatahubKafkaEmitter` does.

Key: the entity URN as UTF-8. Value: Confluent wire format of DataHub's
`MetadataChangeProposal` Avro schema (subject `<topic>-value`), produced by confluent-kafka's
`AvroSerializer` from `mcp.to_obj(tuples=True)`, the emitter's own conversion.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from datahub.emitter.mcp import MetadataChangeProposalWrapper, _make_generic_aspect
from datahub.metadata.schema_classes import GenericAspectClass, MetadataChangeProposalClass
from datahub.metadata.schemas import getMetadataChangeProposalSchema

_MEMO = "_mlflow_datahub_generic_aspect"


def generic_aspect(mcp: MetadataChangeProposalWrapper) -> GenericAspectClass:
    """The aspect as DataHub serialises it into the MCP (`make_mcp`'s own `_make_generic_aspect`),
    computed once per proposal: the state's fingerprint and the Avro value both use it."""
    cached = mcp.__dict__.get(_MEMO)
    if cached is not None and cached[0] is mcp.aspect:
        return cached[1]
    assert mcp.aspect is not None
    generic = _make_generic_aspect(mcp.aspect)
    mcp.__dict__[_MEMO] = (mcp.aspect, generic)
    return generic


def forget(mcp: MetadataChangeProposalWrapper) -> MetadataChangeProposalWrapper:
    """Drop the cached serialisation (before changing the aspect in place)."""
    mcp.__dict__.pop(_MEMO, None)
    return mcp


def proposal(mcp: MetadataChangeProposalWrapper) -> MetadataChangeProposalClass:
    """`mcp.make_mcp()`, reusing the cached aspect serialisation. `MetadataChangeProposalWrapper.to_obj`
    is `make_mcp().to_obj()`, so the emitter's bytes and these are the same."""
    if mcp.entityKeyAspect is not None:
        return mcp.make_mcp()
    made = mcp._make_mcp_without_aspects()
    made.aspect = generic_aspect(mcp)
    return made


def _to_dict(mcp: MetadataChangeProposalWrapper | MetadataChangeProposalClass, ctx: Any) -> dict:
    return mcp.to_obj(tuples=True)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)) if parts.username or parts.password else url


class RegistryUnavailable(Exception):
    """The schema registry did not answer, or refused the MCP schema: nothing can be written."""


class McpSerializer:
    def __init__(self, registry_url: str, registry_config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self.registry_url = _without_credentials(registry_url)  # for messages
        client = SchemaRegistryClient({"url": registry_url, **registry_config})
        self._avro = AvroSerializer(
            schema_str=getMetadataChangeProposalSchema(), schema_registry_client=client, to_dict=_to_dict
        )
        self._ctx = SerializationContext(topic, MessageField.VALUE)

    @staticmethod
    def key(mcp: MetadataChangeProposalWrapper) -> bytes:
        return str(mcp.entityUrn).encode("utf-8")

    def value(self, mcp: MetadataChangeProposalWrapper | MetadataChangeProposalClass) -> bytes:
        """Confluent wire format; the schema is registered (once, then cached) on first use.
        Raises RegistryUnavailable when the registry cannot be reached or refuses the schema."""
        try:
            data = self._avro(proposal(mcp) if isinstance(mcp, MetadataChangeProposalWrapper) else mcp, self._ctx)
        except SerializationError:
            raise
        except SchemaRegistryError as e:
            raise RegistryUnavailable(
                f"schema registry at {self.registry_url} refused subject {self.topic}-value: {e}") from e
        except Exception as e:  # the registry client's transport errors: refused, timeout, DNS
            raise RegistryUnavailable(
                f"schema registry at {self.registry_url} unreachable: {str(e).strip() or type(e).__name__}") from e
        assert data is not None
        return data


class McpDeserializer:
    """Reads the MCP topic back into `MetadataChangeProposalClass` objects."""

    def __init__(self, registry_url: str, registry_config: dict[str, Any], topic: str) -> None:
        client = SchemaRegistryClient({"url": registry_url, **registry_config})
        self._avro = AvroDeserializer(client, schema_str=getMetadataChangeProposalSchema())
        self._ctx = SerializationContext(topic, MessageField.VALUE)

    def __call__(self, value: bytes) -> MetadataChangeProposalClass:
        return MetadataChangeProposalClass.from_obj(self._avro(value, self._ctx), tuples=True)
