"""Any name MLflow accepts goes through (connector/mlflow/reader.py filter strings, connector/datahub/mapping.py
URNs). Pure: filters are checked with MLflow's own filter parser, URNs with acryl-datahub's `Urn`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from datahub.emitter.mce_builder import make_ml_model_group_urn, make_ml_model_urn
from datahub.metadata.urns import MlModelGroupUrn, MlModelUrn, Urn
from datahub.utilities.urn_encoder import UrnEncoder
from datahub.utilities.urns.error import InvalidUrnError
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.search_utils import SearchModelUtils, SearchModelVersionUtils, SearchUtils

from connector.contract.events import ChangeEvent
from connector.datahub.mapping import (
    MAX_URN_BYTES,
    MappingSettings,
    UrnTooLong,
    model_group_urn,
    model_urn,
    to_mcps,
    urn_bytes,
)
from connector.mlflow import entities as changes
from connector.mlflow.reader import (
    MAX_FILTER_URL_BYTES,
    MlflowReader,
    ReaderSettings,
    ValueSearch,
    like_pattern,
    quoted,
    url_bytes,
    value_searches,
)
from tests import mlflow_objects as mo
from tests.hostile_names import HOSTILE, urns_in

ORDINARY = ["demo classifier", "model without versions", "demo/m x", "my-model.v2", "Ünicode", "a b  c",
            "O'Brien", "50%", "back\\slash", "semi;colon"]


def parse(filter_string: str, utils: type[SearchUtils] = SearchModelVersionUtils) -> dict[str, Any]:
    """MLflow's own reading of a filter of one comparison."""
    parsed = utils.parse_search_filter(filter_string)
    assert len(parsed) == 1, (filter_string, parsed)
    return parsed[0]


def matches(search: ValueSearch, utils: type[SearchUtils] = SearchModelVersionUtils) -> set[str] | None:
    """The values MLflow looks for with this search; None for a LIKE pattern (checked separately)."""
    comparison = parse(search.filter_string, utils)
    if comparison["comparator"] == "IN":
        return set(comparison["value"])
    if comparison["comparator"] == "=":
        return {comparison["value"]}
    assert comparison["comparator"] == "LIKE", comparison
    return None


# ---- filter strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_a_quoted_value_reads_back_exactly(value: str) -> None:
    literal = quoted(value)
    if literal is None:
        assert ("'" in value and '"' in value) or value.endswith("\\")
        return
    assert parse(f"name = {literal}")["value"] == value
    assert parse(f"name = {literal}", SearchModelUtils)["value"] == value


@pytest.mark.parametrize("value", HOSTILE)
def test_a_list_literal_reads_back_exactly(value: str) -> None:
    literal = quoted(value, in_list=True)
    if literal is None:
        assert ("'" in value and '"' in value) or any(c in value for c in "\\\n\r\x00")
        return
    assert parse(f"name IN ({literal}, 'other')")["value"] == (value, "other")
    assert parse(f"attributes.run_id IN ({literal}, 'other')", SearchUtils)["value"] == (value, "other")


def test_the_issue_examples() -> None:
    assert quoted("O'Brien") == '"O\'Brien"'
    assert quoted('say "hi"') == "'say \"hi\"'"
    assert quoted("back\\slash") == "'back\\slash'"  # fine alone ...
    assert quoted("back\\slash", in_list=True) is None  # ... but an escape in a list
    assert quoted("both ' and \"") is None
    # what the connector used to send reads as another name, and the list as "ill-formed"
    assert parse("name = 'O\\'Brien'")["value"] == "O\\'Brien"
    with pytest.raises(MlflowException, match="ill-formed"):
        parse("name IN ('trail\\', 'x')")


def test_value_searches_find_every_value_exactly() -> None:
    searches = value_searches("name", HOSTILE)
    covered = [v for s in searches for v in s.values]
    assert sorted(covered) == sorted(set(HOSTILE))  # each value in exactly one search
    for search in searches:
        assert url_bytes(search.filter_string) <= MAX_FILTER_URL_BYTES, search
        looked_for = matches(search)
        if looked_for is not None:
            assert looked_for == search.values, search
            assert search.is_list == (len(search.values) > 1)
        else:  # a coarser pattern: it matches the value (the answer is selected exactly)
            (value,) = search.values
            pattern = parse(search.filter_string)["value"]
            assert SearchUtils.get_comparison_func("LIKE")(value, pattern), search
            assert ("'" in value and '"' in value) or value.endswith("\\") or url_bytes(f"name = '{value}'") > 2900


def test_without_lists_every_value_is_searched_alone() -> None:
    searches = value_searches("name", HOSTILE, lists=False)
    assert all(not s.is_list and len(s.values) == 1 for s in searches)
    assert sorted(v for s in searches for v in s.values) == sorted(set(HOSTILE))


def test_a_single_value_is_a_comparison_not_a_list() -> None:
    assert value_searches("name", ["demo classifier"]) == [ValueSearch("name = 'demo classifier'",
                                                                       frozenset({"demo classifier"}))]
    assert value_searches("name", []) == []


@pytest.mark.parametrize("budget", [120, 400, MAX_FILTER_URL_BYTES])
def test_lists_are_packed_by_encoded_length(budget: int) -> None:
    run_ids = [f"{n:032x}" for n in range(500)]
    searches = value_searches("attributes.run_id", run_ids, budget=budget)
    assert sorted(v for s in searches for v in s.values) == run_ids
    for search in searches:
        assert url_bytes(search.filter_string) <= budget
        assert matches(search, SearchUtils) == search.values
    # packed: a list is cut only where the next value would not have fitted
    for search, following in zip(searches, searches[1:], strict=False):
        longer = search.filter_string[:-1] + f", '{min(following.values)}')"
        assert url_bytes(longer) > budget
    # the old batches of 100 ids: over gunicorn's request line (4094 bytes) once URL-encoded
    assert url_bytes("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids[:100]) + ")") > 4094


def test_multibyte_names_are_measured_encoded() -> None:
    names = [f"模型 {n}" for n in range(300)]
    searches = value_searches("name", names)
    assert len(searches) > 1
    assert all(url_bytes(s.filter_string) <= MAX_FILTER_URL_BYTES for s in searches)
    assert sorted(v for s in searches for v in s.values) == sorted(names)


def test_like_pattern() -> None:
    assert like_pattern("both ' and \" \\") == "both _ and _ _"
    long = like_pattern("🚀" * 250, budget=200)
    assert long.endswith("%") and url_bytes(long) <= 200
    assert SearchUtils.get_comparison_func("LIKE")("🚀" * 250, long)


# ---- a server that takes no lists (MLflow 2.x: run ids only) ------------------------------------


class RefusesNameLists:
    """A search function as MLflow 2.x answers it: `name IN (...)` is HTTP 400; `=` and LIKE work."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.filters = names, []  # type: ignore[var-annotated]

    def __call__(self, filter_string: str) -> Iterator[list[str]]:
        self.filters.append(filter_string)
        comparison = parse(filter_string)
        if comparison["comparator"] == "IN":
            raise MlflowException("Only the 'run_id' attribute supports comparison with a list of quoted "
                                  "string values.", error_code=INVALID_PARAMETER_VALUE)
        value = comparison["value"]
        like = SearchUtils.get_comparison_func("LIKE")
        found = [n for n in self.names if (n == value if comparison["comparator"] == "=" else like(n, value))]
        yield found + ["decoy " + value]  # more than asked for: selected exactly on the connector's side


def test_a_server_that_refuses_lists_is_asked_one_value_at_a_time() -> None:
    reader = MlflowReader(ReaderSettings("http://127.0.0.1:9", "http://127.0.0.1:9"))
    wanted = ["a", "b", "O'Brien", "both ' and \"", "trail\\"]
    search = RefusesNameLists(wanted + ["c", "both x and y"])
    pages = list(reader._by_values("search_model_versions", search, "name", wanted, lambda n: n))
    assert sorted(n for page in pages for n in page) == sorted(wanted)
    assert reader.lists_refused == frozenset({"search_model_versions name"})
    refused = len(search.filters)
    # remembered: the next search asks one value at a time at once
    again = list(reader._by_values("search_model_versions", search, "name", ["a", "b"], lambda n: n))
    assert sorted(n for page in again for n in page) == ["a", "b"]
    assert len(search.filters) == refused + 2 and all(" IN " not in f for f in search.filters[refused:])
    # other searches still use lists
    assert len(value_searches("run_id", ["r1", "r2"])) == 1


def test_other_errors_are_not_taken_for_a_refused_list() -> None:
    reader = MlflowReader(ReaderSettings("http://127.0.0.1:9", "http://127.0.0.1:9"))

    def broken(filter_string: str) -> Iterator[list[str]]:
        raise MlflowException("boom", error_code=INVALID_PARAMETER_VALUE)
        yield []

    with pytest.raises(MlflowException):
        list(reader._by_values("search_model_versions", broken, "name", ["only one"], lambda n: n))
    assert reader.lists_refused == frozenset()


# ---- URNs ---------------------------------------------------------------------------------------


SETTINGS = [MappingSettings(), MappingSettings(env="DEV", model_name_separator="-"), MappingSettings(env="dev")]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_names_keep_the_originals_urns(name: str, settings: MappingSettings) -> None:
    assert model_group_urn(name, settings) == make_ml_model_group_urn("mlflow", name, settings.env)
    assert model_urn(name, "3", settings) == make_ml_model_urn(
        "mlflow", f"{name}{settings.model_name_separator}3", settings.env)


@pytest.mark.parametrize("name", [n for n in HOSTILE if UrnEncoder.contains_reserved_char(n)])
def test_reserved_characters_are_encoded_as_datahubs_typed_classes_do(name: str) -> None:
    settings = MappingSettings()
    with pytest.raises(InvalidUrnError):  # what the original wrote does not parse
        Urn.from_string(make_ml_model_group_urn("mlflow", name, "PROD"))
    assert model_group_urn(name, settings) == str(MlModelGroupUrn("mlflow", name, "PROD"))
    assert model_urn(name, "1", settings) == str(MlModelUrn("mlflow", f"{name}_1", "PROD"))
    assert MlModelUrn.from_string(model_urn(name, "1", settings)).name == UrnEncoder.encode_string(f"{name}_1")


def _events(name: str) -> list[ChangeEvent]:
    run = mo.run(run_name=name, datasets=[mo.dataset_input(name, "local"), mo.dataset_input(name, "s3")],
                 params={name: name}, tags={name: name})
    model = mo.registered_model(name, aliases={"champion": "1"}, tags={name: name})
    version = mo.model_version(name, "1", tags={name: name})
    return [
        mo.changed("EXPERIMENT", changes.experiment_state(mo.experiment(name=name, tags={name: name}))),
        mo.run_event(run, experiment_name=name, versions=[(name, "1"), (name, "2")]),
        mo.changed("REGISTERED_MODEL", changes.registered_model_state(model)),
        mo.model_version_event(version, model, run),
    ]


@pytest.mark.parametrize("settings", SETTINGS[:2])
@pytest.mark.parametrize("name", [n for n in HOSTILE if len(n.encode()) < 250])
def test_every_urn_written_for_a_hostile_name_parses_and_round_trips(name: str, settings: MappingSettings) -> None:
    settings = MappingSettings(env=settings.env, model_name_separator=settings.model_name_separator,
                               materialize_dataset_inputs=True)
    for event in _events(name):
        entity = to_mcps(event, settings).entity
        assert entity is not None
        for mcp in entity.mcps:
            assert mcp.entityUrn is not None and mcp.aspect is not None
            aspect = json.loads(json.dumps(mcp.aspect.to_obj()))
            for urn in [mcp.entityUrn, *urns_in(aspect)]:
                parsed = Urn.from_string(urn)
                assert str(parsed) == urn
                assert urn_bytes(urn) <= MAX_URN_BYTES


def test_distinct_names_get_distinct_urns() -> None:
    names = ["a,b", "a(b", "a)b", "a b", "a_b", "a%b"]
    assert len({model_group_urn(n, MappingSettings()) for n in names}) == len(names)


# ---- URNs over DataHub's limit ------------------------------------------------------------------


def test_urn_bytes_measures_as_javas_url_encoder() -> None:
    assert urn_bytes("aZ09.-*_") == 8
    assert urn_bytes("a b") == 3  # a space is `+`
    assert urn_bytes("a~b:(,)") == 2 + 3 * 5  # `~` too is encoded by Java
    assert urn_bytes("é") == 6 and urn_bytes("🚀") == 12


def _longest_ok_name(urn_of: Any) -> str:
    name = "m"
    while urn_bytes(urn_of(name + "m")) <= MAX_URN_BYTES:
        name += "m"
    return name


def test_a_model_name_over_the_limit_is_an_error_naming_it() -> None:
    settings = MappingSettings()
    fits = _longest_ok_name(lambda n: model_group_urn(n, settings))  # the longer of the two URNs
    model = mo.registered_model(fits)
    assert to_mcps(mo.changed("REGISTERED_MODEL", changes.registered_model_state(model)), settings).entity
    assert to_mcps(mo.model_version_event(mo.model_version(fits, "1")), settings).entity
    with pytest.raises(UrnTooLong, match=r"^registered model 'mmmm.*\(\d+ characters\): the URN "
                                         r"'urn:li:mlModelGroup:.* bytes URL-encoded, over DataHub's limit of 512"):
        to_mcps(mo.changed("REGISTERED_MODEL", changes.registered_model_state(mo.registered_model(fits + "m"))),
                settings)
    with pytest.raises(UrnTooLong, match=r"^model 'mmmm.*\(\d+ characters\) version 10: the URN 'urn:li:mlModel:"):
        to_mcps(mo.model_version_event(mo.model_version(fits + "mmmm", "10")), settings)


def test_few_characters_can_be_over_the_limit_encoded() -> None:
    name = "🚀" * 40  # 160 bytes of UTF-8, 480 URL-encoded
    assert len(model_group_urn(name, MappingSettings())) < 200
    with pytest.raises(UrnTooLong, match="registered model"):
        to_mcps(mo.changed("REGISTERED_MODEL", changes.registered_model_state(mo.registered_model(name))),
                MappingSettings())


def test_a_dataset_over_the_limit_names_the_run() -> None:
    run = mo.run("abc123", datasets=[mo.dataset_input("d" * 600, "local")])
    with pytest.raises(UrnTooLong, match=r"^run abc123: the URN 'urn:li:dataset:"):
        to_mcps(mo.run_event(run), MappingSettings())
