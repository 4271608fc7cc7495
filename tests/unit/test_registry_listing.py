"""A registry listing is only trusted when its two searches agree (connector.mlflow.listing)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from connector.mlflow import listing
from connector.mlflow.listing import RegistryIndex, UntrustedListing, read_registry, registry_contradictions
from connector.mlflow.reader import ReaderSettings


@dataclass
class Version:
    name: str
    version: str
    run_id: str | None = None


def model(name: str, latest: list[str]) -> dict:
    return {"name": name, "description": None, "creation_timestamp": 1, "last_updated_timestamp": 1, "tags": [],
            "aliases": [], "latest_versions": [{"version": v, "stage": "None"} for v in latest]}


def index(models: list[dict], versions: list[Version]) -> RegistryIndex:
    return RegistryIndex(models={m["name"]: m for m in models}, versions=list(versions))  # type: ignore[arg-type]


def test_agreeing_searches_are_trusted() -> None:
    assert registry_contradictions(index([model("a", ["2"]), model("b", [])],
                                         [Version("a", "1"), Version("a", "2")])) is None
    assert registry_contradictions(index([], [])) is None


def test_versions_of_unlisted_models_are_a_contradiction() -> None:
    why = registry_contradictions(index([], [Version("a", "1"), Version("b", "3")]))
    assert why is not None and "2 registered models that the search of registered models did not return" in why
    assert "'a'" in why


def test_latest_versions_missing_from_the_version_search_are_a_contradiction() -> None:
    why = registry_contradictions(index([model("a", ["1", "2"])], [Version("a", "1")]))
    assert why is not None and "1 latest versions" in why and "'a version 2'" in why


def test_a_race_is_read_again_and_a_lasting_contradiction_is_untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [index([], [Version("new", "1")]), index([model("new", ["1"])], [Version("new", "1")])]
    monkeypatch.setattr(listing, "_read_registry_once", lambda reader: answers.pop(0))
    assert list(read_registry(object()).models) == ["new"]  # type: ignore[arg-type]

    reader = SimpleNamespace(settings=ReaderSettings("http://u:pw@mlflow", "http://u:pw@mlflow"))
    monkeypatch.setattr(listing, "_read_registry_once", lambda r: index([], [Version("m", "1")]))
    with pytest.raises(UntrustedListing) as e:
        read_registry(reader)  # type: ignore[arg-type]
    assert "answered inconsistently 3 times" in str(e.value) and "pw" not in str(e.value)
