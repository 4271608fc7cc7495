"""Fitting an MCP into the broker's message size (connector/datahub/oversize.py), pure: real aspects of
acryl-datahub, serialised without a schema registry (the aspect's JSON as DataHub writes it, or the
whole proposal's JSON), so every size below is a real serialised size."""

from __future__ import annotations

import copy
import json
import re

import pytest
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import MLHyperParamClass, MLMetricClass, MLTrainingRunPropertiesClass

from connector.datahub.aspects import forget, generic_aspect, make_generic_aspect
from connector.datahub.oversize import CannotFit, fit_to_size

URN = "urn:li:dataProcessInstance:0d03f13b7d7e45b59784c93c1b108efd"


def aspect_json(m: MetadataChangeProposalWrapper) -> bytes:
    """The aspect's bytes as DataHub puts them into the MCP (what the consumer's Avro value carries)."""
    assert m.aspect is not None
    return make_generic_aspect(m.aspect).value


def proposal_json(m: MetadataChangeProposalWrapper) -> bytes:
    """The whole proposal as JSON: the aspect nested as an escaped string, so items cost more than
    the aspect's own JSON says (fit_to_size's estimate is off and must correct itself)."""
    return json.dumps(m.to_obj()).encode()


def cached(m: MetadataChangeProposalWrapper) -> bytes:
    """The connector's memoised serialisation: a stale memo would give the bytes of the uncut aspect."""
    return generic_aspect(m).value


def training_run(params: int = 3000, metrics: int = 500, custom: int = 0, run_id: str = "r1"
                 ) -> MetadataChangeProposalWrapper:
    aspect = MLTrainingRunPropertiesClass(
        id=run_id,
        externalUrl="http://mlflow.example:5000/#/experiments/1/runs/r1",
        hyperParams=[MLHyperParamClass(name=f"param_{i:05d}", value=f"value {i}") for i in range(params)] or None,
        trainingMetrics=[MLMetricClass(name=f"metric_{i:05d}", value=str(i / 7)) for i in range(metrics)] or None,
        customProperties={f"property_{i:05d}": f"v{i}" for i in range(custom)},
    )
    return MetadataChangeProposalWrapper(entityUrn=URN, aspect=aspect)


def props(m: MetadataChangeProposalWrapper) -> MLTrainingRunPropertiesClass:
    assert isinstance(m.aspect, MLTrainingRunPropertiesClass)
    return m.aspect


def names(items: list | None) -> list[str]:
    return [item.name for item in items or []]


@pytest.mark.parametrize("serialize", [aspect_json, proposal_json, cached], ids=["aspect", "proposal", "cached"])
@pytest.mark.parametrize("limit", [100_000, 50_000, 20_000])
def test_result_fits_and_keeps_a_prefix_of_each_list(serialize, limit: int) -> None:
    mcp = training_run()
    assert len(serialize(mcp)) > limit
    fitted, value, _ = fit_to_size(mcp, serialize, limit)
    assert limit * 0.95 < len(value) <= limit  # cut to the limit, not far below it
    assert value == serialize(forget(copy.deepcopy(fitted)))  # the bytes are those of the returned MCP
    for field in ("hyperParams", "trainingMetrics"):
        kept, original = names(getattr(props(fitted), field)), names(getattr(props(mcp), field))
        assert kept == original[:len(kept)], field  # in order, none skipped, none invented
    assert props(fitted).hyperParams is not None and len(props(fitted).hyperParams or []) < 3000


def test_keeps_as_many_items_as_fit() -> None:
    """Items are kept while they fit: with the aspect's own JSON as the measure, one more would not."""
    mcp = training_run()
    for limit in (120_000, 60_000, 40_000):
        fitted, value, _ = fit_to_size(mcp, aspect_json, limit)
        kept = len(props(fitted).hyperParams or [])
        assert 0 < kept < 3000
        one_more = copy.deepcopy(fitted)
        props(one_more).hyperParams = props(mcp).hyperParams[:kept + 1]  # type: ignore[index]
        assert len(aspect_json(one_more)) > limit
        assert len(value) > limit - 100


def test_largest_list_is_cut_first_and_smaller_ones_are_left_whole() -> None:
    mcp = training_run(params=3000, metrics=500, custom=50)
    fitted, value, note = fit_to_size(mcp, aspect_json, 60_000)
    assert len(value) <= 60_000
    assert 0 < len(props(fitted).hyperParams or []) < 3000
    assert names(props(fitted).trainingMetrics) == names(props(mcp).trainingMetrics)
    assert props(fitted).customProperties == props(mcp).customProperties
    assert props(fitted).id == "r1" and props(fitted).externalUrl == props(mcp).externalUrl
    assert "trainingMetrics" not in note and "customProperties" not in note


def test_next_largest_is_cut_once_the_largest_is_emptied() -> None:
    mcp = training_run(params=3000, metrics=50, custom=1000)  # sizes: hyperParams > customProperties > metrics
    empty_params = copy.deepcopy(mcp)
    props(empty_params).hyperParams = []
    limit = len(aspect_json(empty_params)) - 2000  # even without any hyperParam it is too large
    fitted, value, note = fit_to_size(mcp, aspect_json, limit)
    assert len(value) <= limit
    assert props(fitted).hyperParams == []
    custom = list(props(fitted).customProperties.items())
    assert 0 < len(custom) < 1000 and custom == list(props(mcp).customProperties.items())[:len(custom)]
    assert names(props(fitted).trainingMetrics) == names(props(mcp).trainingMetrics)  # the smallest: untouched
    assert note.endswith(f"(kept hyperParams 0 of 3000, customProperties {len(custom)} of 1000)")  # in cut order


def test_nothing_after_an_item_that_does_not_fit_is_kept() -> None:
    """Kept items are a prefix: a small item after a large one that does not fit is dropped too."""
    mcp = training_run(params=0, metrics=10)
    params = [MLHyperParamClass(name=f"p{i}", value="v") for i in range(100)]
    params[50] = MLHyperParamClass(name="p50", value="x" * 20_000)
    props(mcp).hyperParams = params
    fitted, value, _ = fit_to_size(mcp, aspect_json, 10_000)
    assert len(value) <= 10_000
    assert names(props(fitted).hyperParams) == [f"p{i}" for i in range(50)]
    assert names(props(fitted).trainingMetrics) == names(props(mcp).trainingMetrics)


def test_a_map_field_is_cut_to_a_prefix_of_its_entries() -> None:
    mcp = training_run(params=10, metrics=10, custom=3000)  # customProperties is the largest field
    fitted, value, note = fit_to_size(mcp, aspect_json, 40_000)
    assert len(value) <= 40_000
    kept = props(fitted).customProperties
    assert 0 < len(kept) < 3000
    assert list(kept.items()) == list(props(mcp).customProperties.items())[:len(kept)]
    assert names(props(fitted).hyperParams) == names(props(mcp).hyperParams)
    assert f"kept customProperties {len(kept)} of 3000)" in note


def test_note_names_the_entity_the_aspect_and_what_was_kept() -> None:
    mcp = training_run()
    size = len(aspect_json(mcp))
    fitted, value, note = fit_to_size(mcp, aspect_json, 50_000)
    kept = len(props(fitted).hyperParams or [])
    assert note.startswith(f"{URN}: aspect mlTrainingRunProperties is {size} bytes, over the 50000-byte")
    assert f"truncated to {len(value)} bytes" in note
    assert note.endswith(f"(kept hyperParams {kept} of 3000)")
    assert re.search(r"kept hyperParams \d+ of 3000", note)


def test_input_mcp_is_not_mutated() -> None:
    mcp = training_run(custom=2000)
    before = aspect_json(mcp)
    memo = generic_aspect(mcp)  # the caller's MCP carries its memoised serialisation
    original_params = props(mcp).hyperParams
    fitted, _, _ = fit_to_size(mcp, cached, 20_000)
    assert fitted is not mcp and fitted.aspect is not mcp.aspect
    assert props(mcp).hyperParams is original_params and len(original_params or []) == 3000
    assert len(props(mcp).trainingMetrics or []) == 500 and len(props(mcp).customProperties) == 2000
    assert aspect_json(mcp) == before
    assert generic_aspect(mcp) is memo and memo.value == before


def test_returned_mcp_serialises_to_the_returned_bytes_even_through_the_memo() -> None:
    """The connector serialises through a memo on the MCP; the memo of the returned copy must be
    that of the cut aspect, not the original's one copied along."""
    mcp = training_run()
    generic_aspect(mcp)  # memo of the full aspect
    fitted, value, _ = fit_to_size(mcp, cached, 30_000)
    assert generic_aspect(fitted).value == value
    assert make_generic_aspect(props(fitted)).value == value


def test_aspect_that_cannot_fit_even_emptied_raises() -> None:
    mcp = training_run(params=100, metrics=100, run_id="x" * 20_000)  # a field no cut can shorten
    with pytest.raises(CannotFit) as raised:
        fit_to_size(mcp, aspect_json, 10_000)
    message = str(raised.value)
    assert message.startswith(f"{URN}: aspect mlTrainingRunProperties is {len(aspect_json(mcp))} bytes")
    assert "10000-byte" in message and "even with every list and map emptied" in message
    assert isinstance(raised.value, ValueError)  # the callers' `except ValueError` takes it
    assert len(props(mcp).hyperParams or []) == 100  # the input is left as it was


def test_aspect_without_any_list_over_the_limit_raises() -> None:
    mcp = training_run(params=0, metrics=0, run_id="y" * 5000)
    with pytest.raises(CannotFit):
        fit_to_size(mcp, aspect_json, 1000)


def test_mcp_that_already_fits_comes_back_as_an_equal_copy() -> None:
    """The consumer calls fit_to_size only for an MCP over the limit; one that fits is returned as a
    copy with every item and its own bytes."""
    mcp = training_run()
    value = aspect_json(mcp)
    fitted, fitted_value, _ = fit_to_size(mcp, aspect_json, len(value))
    assert fitted_value == value
    assert fitted is not mcp
    assert names(props(fitted).hyperParams) == names(props(mcp).hyperParams)
    assert names(props(fitted).trainingMetrics) == names(props(mcp).trainingMetrics)


def test_note_for_an_mcp_that_already_fits_does_not_claim_it_is_over_the_limit() -> None:
    mcp = training_run(params=10, metrics=10)
    _, _, note = fit_to_size(mcp, aspect_json, 1_000_000)
    assert "over the" not in note and "truncated" not in note
