"""Fitting an aspect into the broker's message size, the way DataHub's ingestion does it
(`EnsureAspectSizeProcessor`): the largest list or map fields of the aspect are truncated, and a
warning names the entity and what was cut. Never silent, never a crash."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

from datahub.emitter.mcp import MetadataChangeProposalWrapper


class CannotFit(ValueError):
    """The aspect is too large even with every list and map emptied."""


def _collections(aspect: object) -> dict[str, int]:
    """Size in JSON bytes of each non-empty list or map field of the aspect."""
    sizes = {}
    for name in aspect.__class__.__dict__:  # generated properties: one per Avro field
        if name.startswith("_") or name.isupper():
            continue
        value = getattr(aspect, name, None)
        if isinstance(value, (list, dict)) and value:
            sizes[name] = len(json.dumps(value, default=lambda o: o.to_obj()))
    return sizes


def fit_to_size(
    mcp: MetadataChangeProposalWrapper, serialize: Callable[[MetadataChangeProposalWrapper], bytes], limit: int
) -> tuple[MetadataChangeProposalWrapper, bytes, str]:
    """A copy of `mcp` whose serialised value fits in `limit` bytes, its bytes, and a warning."""
    fitted = copy.deepcopy(mcp)
    aspect = fitted.aspect
    original = {name: len(getattr(aspect, name)) for name in _collections(aspect)}
    value = serialize(fitted)
    size = len(value)
    while len(value) > limit:
        sizes = _collections(aspect)
        if not sizes:
            raise CannotFit(f"{mcp.entityUrn} {mcp.aspectName}: {size} bytes, over {limit} even when truncated")
        largest = max(sizes, key=lambda n: sizes[n])
        items = getattr(aspect, largest)
        keep = int(len(items) * min(0.9, limit / len(value)))
        if isinstance(items, list):
            setattr(aspect, largest, items[:keep])
        else:
            setattr(aspect, largest, dict(list(items.items())[:keep]))
        value = serialize(fitted)
    cut = ", ".join(f"{name} {len(getattr(aspect, name))} of {count}" for name, count in original.items()
                    if len(getattr(aspect, name)) != count)
    note = (f"{mcp.entityUrn}: aspect {mcp.aspectName} is {size} bytes, over the {limit}-byte message limit; "
            f"truncated to fit (kept {cut})")
    return fitted, value, note
