"""Fitting an aspect into the broker's message size, the way DataHub's ingestion does it
(`EnsureAspectSizeProcessor` in datahub/ingestion/workunit_processors/ensure_aspect_size.py):
the aspect's size without the list is measured, then items of the list are kept, in order, while
they fit; the rest is dropped and one warning names the entity and how much was dropped. Here the
largest list or map field is cut first (for a run, `hyperParams`), then the next, until the
serialised MCP fits. Never silent, never a crash: an aspect that cannot fit even with every list
and map emptied raises `CannotFit`."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.emitter.serialization_helper import pre_json_transform

from connector.datahub.aspects import forget


class CannotFit(ValueError):
    """The aspect is too large even with every list and map emptied."""


def _plain(value: Any) -> Any:
    if hasattr(value, "to_obj"):
        return value.to_obj()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json_size(value: Any) -> int:
    """Bytes of the value in the aspect's JSON, as DataHub serialises it."""
    return len(json.dumps(pre_json_transform(_plain(value))))


def _collections(aspect: object) -> dict[str, int]:
    """Size in JSON bytes of each non-empty list or map field of the aspect."""
    sizes = {}
    for name, attribute in type(aspect).__dict__.items():  # generated properties: one per Avro field
        if not isinstance(attribute, property):
            continue
        value = getattr(aspect, name, None)
        if isinstance(value, (list, dict)) and value:
            sizes[name] = _json_size(value)
    return sizes


def _items(value: list | dict) -> list[Any]:
    return list(value.items()) if isinstance(value, dict) else list(value)


def _rebuild(template: list | dict, items: list[Any]) -> list | dict:
    return dict(items) if isinstance(template, dict) else items


def _item_size(item: Any) -> int:
    if isinstance(item, tuple):  # a map entry: "key": value
        return len(json.dumps(item[0])) + 2 + _json_size(item[1]) + 2
    return _json_size(item) + 2  # ", " between list items


def fit_to_size(
    mcp: MetadataChangeProposalWrapper, serialize: Callable[[MetadataChangeProposalWrapper], bytes], limit: int
) -> tuple[MetadataChangeProposalWrapper, bytes, str]:
    """A copy of `mcp` whose serialised value fits in `limit` bytes, its bytes, and a warning that
    names the entity, the aspect and what was dropped."""
    fitted = forget(copy.deepcopy(mcp))
    aspect = fitted.aspect
    assert aspect is not None
    serialize_aspect = serialize

    def serialize(m: MetadataChangeProposalWrapper) -> bytes:  # the aspect changes in place here
        return serialize_aspect(forget(m))

    original = {name: len(getattr(aspect, name)) for name in _collections(aspect)}
    value = serialize(fitted)
    size = len(value)
    if size <= limit:
        return fitted, value, f"{mcp.entityUrn}: aspect {mcp.aspectName} is {size} bytes, within the {limit}-byte limit"
    cut: list[str] = []
    while len(value) > limit:
        sizes = _collections(aspect)
        if not sizes:
            raise CannotFit(f"{mcp.entityUrn}: aspect {mcp.aspectName} is {size} bytes, over the {limit}-byte "
                            "message limit even with every list and map emptied")
        largest = max(sizes, key=lambda n: sizes[n])
        current = getattr(aspect, largest)
        items = _items(current)
        # Size of the MCP without this field's items, then keep items in order while they fit.
        setattr(aspect, largest, _rebuild(current, []))
        budget = limit - len(serialize(fitted))
        kept: list[Any] = []
        for item in items:
            cost = _item_size(item)
            if cost > budget:
                break
            kept.append(item)
            budget -= cost
        setattr(aspect, largest, _rebuild(current, kept))
        value = serialize(fitted)
        while len(value) > limit and kept:  # estimate off (escaping, Avro lengths): drop more
            kept = kept[:max(0, len(kept) - max(1, len(kept) // 100))]
            setattr(aspect, largest, _rebuild(current, kept))
            value = serialize(fitted)
        cut.append(largest)
    kept_text = ", ".join(f"{name} {len(getattr(aspect, name))} of {original[name]}"
                          for name in dict.fromkeys(cut) if name in original)
    note = (f"{mcp.entityUrn}: aspect {mcp.aspectName} is {size} bytes, over the {limit}-byte message limit; "
            f"truncated to {len(value)} bytes (kept {kept_text})")
    return fitted, value, note
