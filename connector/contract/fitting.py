"""Fitting a change event into the change topic's message size: an entity too large to travel has
its longest lists truncated, and a note says what was cut. Pure."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from connector.contract.events import ChangeEvent

# Lists that link entities: cut only when nothing else is left to cut.
_LINKS = ("model_versions", "dataset_inputs", "aliases", "latest_versions")


def _lists(entity: dict[str, Any]) -> dict[tuple[str, ...], list[Any]]:
    """The non-empty lists of an entity state, nested records included (a version's run)."""
    found: dict[tuple[str, ...], list[Any]] = {}
    for name, value in entity.items():
        if isinstance(value, list) and value:
            found[(name,)] = value
        elif isinstance(value, dict):
            found.update({(name, *path): v for path, v in _lists(value).items()})
    return found


# Fields that say which entity an event is about: never cut.
_IDENTITY = ("name", "experiment_id", "run_id", "version", "model_id", "experiment_name", "key")


def _texts(entity: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """The free-text fields of an entity state (descriptions, sources), nested records included."""
    found: dict[tuple[str, ...], str] = {}
    for name, value in entity.items():
        if isinstance(value, str) and value and name not in _IDENTITY:
            found[(name,)] = value
        elif isinstance(value, dict):
            found.update({(name, *path): v for path, v in _texts(value).items()})
    return found


def _set(entity: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    head, *rest = path
    return {**entity, head: _set(entity[head], tuple(rest), value) if rest else value}


def fit_event(event: ChangeEvent, encode: Callable[[ChangeEvent], bytes], limit: int
              ) -> tuple[ChangeEvent, bytes, str | None]:
    """The event, encoded within `limit` bytes: an entity too large to travel (a run with very many
    params) has its longest lists truncated (params, metrics and tags before links to other
    entities), then, if that is not enough, its longest free-text fields; the note says what was cut
    and of which entity. An event is never dropped for its size: one that never reached the topic
    would look gone to the consumer's end-of-snapshot check."""
    value = encode(event)
    if len(value) <= limit or event["after"] is None:
        return event, value, None
    size = len(value)
    after: dict[str, Any] = dict(event["after"])  # type: ignore[arg-type]
    original = {path: len(v) for path, v in _lists(after).items()}
    texts = {path: len(v) for path, v in _texts(after).items()}
    while len(value) > limit:
        lists = _lists(after)
        strings = _texts(after)
        if lists:
            candidates = [p for p in lists if p[-1] not in _LINKS] or list(lists)
            largest = max(candidates, key=lambda p: len(json.dumps(lists[p])))
            items = lists[largest]
            after = _set(after, largest, items[: int(len(items) * min(0.9, limit / len(value)))])
        elif strings:
            longest = max(strings, key=lambda p: len(strings[p]))
            text = strings[longest]
            after = _set(after, longest, text[: int(len(text) * min(0.9, limit / len(value)))])
        else:
            raise ValueError(f"change event of {size} bytes cannot be reduced below {limit}")
        event = {**event, "after": after}  # type: ignore[typeddict-item]
        value = encode(event)
    now = _lists(after)
    now_texts = _texts(after)
    cut = ", ".join([f"{'.'.join(path)} {len(now.get(path, []))} of {n}" for path, n in original.items()
                     if len(now.get(path, [])) != n]
                    + [f"{'.'.join(path)} {len(now_texts.get(path, ''))} of {n} characters"
                       for path, n in texts.items() if len(now_texts.get(path, "")) != n])
    return event, value, (f"{event['key']}: change event of {size} bytes is over the {limit}-byte limit of the "
                          f"change topic; truncated to fit (kept {cut})")
