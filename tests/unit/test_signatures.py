"""Model signatures and training data (beyond the original): the MLmodel file -> the contract's
signature, the registered model's features, their MCPs, their ownership and soft deletes, and
reading each signature once per version ever (Known's summaries)."""

from __future__ import annotations

import json
from typing import Any

from datahub.metadata.urns import MlFeatureUrn, Urn

from connector.contract import codec
from connector.contract.events import ChangeEvent, Signature, model_version_key
from connector.datahub.decisions import PartitionState
from connector.datahub.mapping import (
    MappingSettings,
    dataset_input_urns,
    feature_data_type,
    feature_urn,
    model_urn,
    run_urn,
    to_mcps,
)
from connector.mlflow import entities as changes
from connector.mlflow.incremental import Known, version_own_fingerprint
from connector.mlflow.signatures import Signatures
from tests import mlflow_objects as mo
from tests.unit.test_decisions import DELETES, feed, gone, read, snapshot, soft_deleted
from tests.unit.test_mapping import aspects, mcps_of, transform

IRIS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def mlmodel(inputs: list[dict[str, Any]] | None, outputs: list[dict[str, Any]] | None = None) -> str:
    """An MLmodel file as MLflow writes it: the signature's schemas are JSON strings in the YAML."""
    lines = ["artifact_path: model", "flavors:", "  python_function: {loader_module: mlflow.pyfunc.model}"]
    if inputs is not None:
        lines += ["signature:", f"  inputs: '{json.dumps(inputs)}'", f"  outputs: '{json.dumps(outputs or [])}'",
                  "  params: null"]
    return "\n".join(lines) + "\n"


def iris_signature() -> Signature:
    read = changes.parse_mlmodel(mlmodel(
        [{"type": "double", "name": n, "required": True} for n in IRIS]
        + [{"type": "long", "name": "count, total", "required": False},
           {"type": "string", "name": "species", "required": True},
           {"type": "boolean", "name": "flag", "required": True},
           {"type": "datetime", "name": "when", "required": True}],
        [{"type": "long", "name": "prediction", "required": True}]))
    assert read["signature_status"] == "PRESENT", read
    assert read["signature"] is not None
    return read["signature"]


# ---- the MLmodel file -> the contract's signature (pure) ------------------------------------------


def test_column_signature_is_read_with_mlflows_types() -> None:
    signature = iris_signature()
    assert [c["name"] for c in signature["inputs"]][:4] == IRIS
    assert signature["inputs"][0] == {"name": "sepal length (cm)", "type": "double", "kind": "column",
                                      "optional": False, "shape": None}
    assert signature["inputs"][4]["optional"] is True
    assert signature["outputs"] == [{"name": "prediction", "type": "long", "kind": "column", "optional": False,
                                     "shape": None}]


def test_tensor_signature_keeps_dtype_and_shape() -> None:
    read = changes.parse_mlmodel(mlmodel([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}],
                                         [{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]))
    assert read["signature"] == {
        "inputs": [{"name": None, "type": "float32", "kind": "tensor", "optional": False, "shape": [-1, 4]}],
        "outputs": [{"name": None, "type": "int64", "kind": "tensor", "optional": False, "shape": [-1]}],
    }


def test_no_signature_and_bad_files_are_statuses_not_errors() -> None:
    assert changes.parse_mlmodel(mlmodel(None))["signature_status"] == "ABSENT"
    assert changes.parse_mlmodel("")["signature_status"] == "UNREADABLE"
    assert changes.parse_mlmodel("a: [unclosed")["signature_status"] == "UNREADABLE"
    broken = changes.parse_mlmodel("signature:\n  inputs: '[{\"type\": \"no such type\", \"name\": \"x\"}]'\n")
    assert broken["signature_status"] == "UNREADABLE" and broken["signature"] is None, broken
    assert broken["signature_reason"]


def test_model_features_are_the_union_of_its_versions_by_name() -> None:
    v1: Signature = {"inputs": [{"name": "a", "type": "long", "kind": "column", "optional": False, "shape": None},
                                {"name": "b", "type": "double", "kind": "column", "optional": False, "shape": None}],
                     "outputs": []}
    v10: Signature = {"inputs": [{"name": "a", "type": "double", "kind": "column", "optional": True, "shape": None},
                                 {"name": None, "type": "float32", "kind": "tensor", "optional": False,
                                  "shape": [-1]}],
                      "outputs": []}
    model = changes.registered_model_state(mo.registered_model("m"))
    features = changes.with_features(model, [("10", v10), ("2", None), ("1", v1)])["features"]
    # by name; `a` as the highest version (10, not "2" < "10" as strings) has it; unnamed inputs are no features
    assert [(f["name"], f["type"]) for f in features] == [("a", "double"), ("b", "double")]


# ---- MCPs -----------------------------------------------------------------------------------------


def version_event(signature: Signature | None, datasets: list[Any] | None = None, run: bool = True,
                  name: str = "iris (v2), model") -> ChangeEvent:
    mlflow_run = mo.run("r1", datasets=datasets or []) if run else None
    event = mo.model_version_event(mo.model_version(name, "3", run_id="r1" if run else None), None, mlflow_run)
    read = (changes.signature_read("PRESENT", None, signature) if signature is not None
            else changes.signature_read("ABSENT", "its model was logged without a signature"))
    event["after"] = {**event["after"], **read}  # type: ignore[dict-item]
    return event


def test_version_lists_its_features_and_carries_its_signature() -> None:
    settings = MappingSettings()
    name = "iris (v2), model"
    found = aspects(mcps_of(version_event(iris_signature(), name=name), settings))
    props = found[(model_urn(name, "3", settings), "mlModelProperties")]
    expected = [feature_urn(name, c, settings) for c in [*IRIS, "count, total", "species", "flag", "when"]]
    assert props["mlFeatures"] == expected
    for urn in expected:  # names with spaces, parentheses and commas make valid URNs
        parsed = Urn.from_string(urn)
        assert isinstance(parsed, MlFeatureUrn) and str(parsed) == urn
    assert expected[0] == "urn:li:mlFeature:(iris %28v2%29%2C model,sepal length %28cm%29)"
    assert json.loads(props["customProperties"]["mlflow.signature.outputs"]) == [
        {"name": "prediction", "type": "long", "kind": "column", "optional": False}]
    assert props["customProperties"]["stage_hint"] == "production"  # the version's tags stay


def test_version_without_signature_is_as_today() -> None:
    settings = MappingSettings()
    with_none = aspects(mcps_of(version_event(None), settings))
    today = aspects(mcps_of(mo.model_version_event(mo.model_version("iris (v2), model", "3", run_id="r1"), None,
                                                   mo.run("r1")), settings))
    assert with_none == today
    assert "mlFeatures" not in with_none[(model_urn("iris (v2), model", "3", settings), "mlModelProperties")]


def test_training_data_names_the_datasets_the_run_links() -> None:
    settings = MappingSettings(env="DEV")
    datasets = [mo.dataset_input("iris, (train)"), mo.dataset_input("s3 copy", "s3", source="s3://b/k")]
    urn = model_urn("iris (v2), model", "3", settings)
    found = aspects(mcps_of(version_event(None, datasets), settings))
    run_found = aspects(mcps_of(mo.run_event(mo.run("r1", datasets=datasets)), settings))
    run_inputs = [e["destinationUrn"] for e in run_found[(run_urn("r1"), "dataProcessInstanceInput")]["inputEdges"]]
    assert len(run_inputs) == 2
    assert [d["dataset"] for d in found[(urn, "mlModelTrainingData")]["trainingData"]] == run_inputs
    assert found[(urn, "mlModelProperties")]["trainingJobs"] == [run_urn("r1")]
    # without a run: no training data, as there is no training job
    assert (urn, "mlModelTrainingData") not in aspects(mcps_of(version_event(None, run=False), settings))


def test_training_data_leaves_out_inputs_the_run_leaves_out() -> None:
    settings = MappingSettings(materialize_dataset_inputs=True)
    inputs = [changes.run_state(mo.run(datasets=[mo.dataset_input("x", "nowhere-platform"),
                                                  mo.dataset_input("y")]), "e", [])["dataset_inputs"]][0]
    run_found = aspects(mcps_of(mo.run_event(mo.run("r1", datasets=[mo.dataset_input("x", "nowhere-platform"),
                                                                    mo.dataset_input("y")])), settings))
    edges = [e["destinationUrn"] for e in run_found[(run_urn("r1"), "dataProcessInstanceInput")]["inputEdges"]]
    assert dataset_input_urns(inputs, settings) == edges and len(edges) == 1


def model_event(features_of: dict[str, Signature | None], name: str = "iris (v2), model") -> ChangeEvent:
    state = changes.with_features(changes.registered_model_state(mo.registered_model(name)), features_of.items())
    return read("REGISTERED_MODEL", state)


def test_registered_model_writes_and_owns_its_features() -> None:
    settings = MappingSettings()
    name = "iris (v2), model"
    result = transform(model_event({"1": iris_signature()}), settings)
    assert result.entity is not None
    found = aspects(result.entity.mcps)
    urn = feature_urn(name, "sepal length (cm)", settings)
    assert found[(urn, "mlFeatureProperties")] == {
        "customProperties": {"mlflow.type": "double", "mlflow.kind": "column", "mlflow.required": "true"},
        "dataType": "CONTINUOUS"}
    assert found[(urn, "status")] == {"removed": False}
    types = {u: found[(u, "mlFeatureProperties")]["dataType"] for u in result.entity.owned_urns}
    assert types == {feature_urn(name, c, settings): t for c, t in [
        *[(c, "CONTINUOUS") for c in IRIS], ("count, total", "COUNT"), ("species", "TEXT"), ("flag", "BINARY"),
        ("when", "UNKNOWN")]}
    assert found[(urn, "mlFeatureProperties")] and result.warnings == []


def test_feature_data_types() -> None:
    def col(type_: str, kind: str = "column") -> Any:
        return {"name": "x", "type": type_, "kind": kind, "optional": False, "shape": None}

    assert [feature_data_type(col(t)) for t in ("double", "float", "long", "integer", "string", "boolean",
                                                "binary", "datetime", "Array(string)")] == [
        "CONTINUOUS", "CONTINUOUS", "COUNT", "COUNT", "TEXT", "BINARY", "UNKNOWN", "UNKNOWN", "UNKNOWN"]
    assert [feature_data_type(col(t, "tensor")) for t in ("float32", "float64", "int8", "uint64", "bool",
                                                          "str", "object")] == [
        "CONTINUOUS", "CONTINUOUS", "COUNT", "COUNT", "BINARY", "TEXT", "UNKNOWN"]


def test_a_feature_with_a_name_too_long_for_a_urn_is_left_out_with_a_warning() -> None:
    long_name = "模" * 200
    signature: Signature = {"inputs": [{"name": long_name, "type": "double", "kind": "column", "optional": False,
                                        "shape": None}, iris_signature()["inputs"][0]], "outputs": []}
    result = to_mcps(model_event({"1": signature}), MappingSettings())
    assert result.entity is not None and len(result.entity.owned_urns) == 1
    assert len(result.warnings) == 1 and "over DataHub's limit" in result.warnings[0]
    props = aspects(mcps_of(version_event(signature)))[(model_urn("iris (v2), model", "3", MappingSettings()),
                                                         "mlModelProperties")]
    assert props["mlFeatures"] == list(result.entity.owned_urns)


# ---- ownership: a feature goes when no live version lists it ---------------------------------------


def test_feature_no_live_version_lists_is_soft_deleted() -> None:
    settings = MappingSettings()
    name = "iris (v2), model"
    state = PartitionState()
    both = iris_signature()
    fewer: Signature = {"inputs": both["inputs"][:2], "outputs": []}
    feed(state, DELETES, model_event({"1": both, "2": fewer}))
    kept = {feature_urn(name, c, settings) for c in IRIS[:2]}
    dropped = {feature_urn(name, c["name"], settings) for c in both["inputs"][2:]}  # type: ignore[arg-type]
    # version 1 is deleted: the model's event lists version 2's features only
    outcome = feed(state, DELETES, model_event({"2": fewer}))
    assert set(soft_deleted(outcome)) == dropped
    assert not kept & set(soft_deleted(outcome))
    # a version bringing a feature back restores it
    back = feed(state, DELETES, model_event({"2": fewer, "3": both}))
    assert {u for u, a, v in [(str(m.entityUrn), m.aspectName, m.aspect.to_obj()) for m in back.mcps]  # type: ignore[union-attr]
            if a == "status" and v == {"removed": False}} >= dropped
    # the registered model is gone: its features go with it
    outcome = feed(state, DELETES, gone("registered_model:" + name))
    assert set(soft_deleted(outcome)) >= kept | dropped


def test_features_follow_the_snapshots_stale_check() -> None:
    state = PartitionState()
    snapshot(state, DELETES, "s1", [model_event({"1": iris_signature()}), read("REGISTERED_MODEL",
             changes.registered_model_state(mo.registered_model("other")))])
    outcome = snapshot(state, DELETES, "s2", [read("REGISTERED_MODEL",
                                                   changes.registered_model_state(mo.registered_model("other")))])
    assert len(soft_deleted(outcome)) == 1 + 8  # the model not seen, and its eight features


# ---- the contract and the producer's summaries -------------------------------------------------------


def test_v3_event_round_trips_through_the_codec() -> None:
    event = version_event(iris_signature(), [mo.dataset_input()])
    assert codec.decode(codec.encode(event)) == event
    model = model_event({"1": iris_signature()})
    assert codec.decode(codec.encode(model)) == model
    assert max(codec.schema_versions()) == 3


def test_signature_is_kept_in_the_summary_and_restored() -> None:
    event = version_event(iris_signature())
    state = event["after"]
    key = event["key"]
    summary = json.loads(json.dumps(Known.summary("MODEL_VERSION", state)))  # as the producer-offsets topic holds it
    known = Known()
    known.restore("MODEL_VERSION", key, summary)
    assert known.signatures[key]["signature"] == iris_signature()
    # the version's own fingerprint (change detection of cycles) does not depend on the signature
    bare = changes.model_version_state(mo.model_version("iris (v2), model", "3", run_id="r1"), [], None)
    assert version_own_fingerprint(state) == version_own_fingerprint(bare)  # type: ignore[arg-type]
    known.restore("MODEL_VERSION", key, None)
    assert key not in known.signatures


class CountingReader:
    """Stands in for the MLflow edge: answers model_version_file from a dict and counts the requests."""

    def __init__(self, files: dict[tuple[str, str], str | Exception]) -> None:
        self.files = files
        self.asked: list[tuple[str, str]] = []

    def model_version_file(self, name: str, version: str, path: str = "MLmodel") -> str:
        self.asked.append((name, version))
        answer = self.files[(name, version)]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_signatures_are_read_once_and_unavailable_ones_again() -> None:
    from connector.mlflow.reader import ArtifactUnreadable, MlflowUnavailable

    reader = CountingReader({("m", "1"): mlmodel([{"type": "double", "name": "x", "required": True}]),
                             ("m", "2"): ArtifactUnreadable("MLflow at http://x has no such file (HTTP 404)"),
                             ("m", "3"): MlflowUnavailable("MLflow at http://x did not answer")})
    known = Known()
    signatures = Signatures(reader, known)  # type: ignore[arg-type]
    versions = [mo.model_version("m", v) for v in ("1", "2", "3")]
    reads = [signatures.of(v) for v in versions]
    assert [r["signature_status"] for r in reads] == ["PRESENT", "UNREADABLE", "UNAVAILABLE"]
    assert signatures.warnings == {"UNREADABLE": 1, "UNAVAILABLE": 1}
    # published: the summaries go to Known (as after the producer's commit, or a restart)
    for v, r in zip(versions, reads, strict=True):
        state = changes.model_version_state(v, [], None, r)
        known.restore("MODEL_VERSION", model_version_key("m", v.version), Known.summary("MODEL_VERSION", state))
    signatures.begin()
    reader.asked.clear()
    again = [signatures.of(v) for v in versions]
    assert reader.asked == [("m", "3")]  # only what MLflow did not answer is asked again
    assert again[:2] == reads[:2]


def test_reading_signatures_can_be_switched_off() -> None:
    reader = CountingReader({})
    signatures = Signatures(reader, Known(), enabled=False)  # type: ignore[arg-type]
    assert signatures.of(mo.model_version("m", "1")) == changes.NOT_READ
    signatures.prefetch([mo.model_version("m", "2"), mo.model_version("m", "3")])
    assert reader.asked == [] and signatures.requests == 0


def test_a_snapshot_takes_what_was_read_and_the_features_pass_reads_the_rest() -> None:
    """`known` (a snapshot's listing) never asks MLflow; `unread_models` lists, by registered model, the
    versions never read or not for want of an answer: what the features pass after the snapshot reads."""
    reader = CountingReader({})
    known = Known()
    reads = {("m", "1"): changes.signature_read("PRESENT", None, iris_signature()),
             ("m", "2"): changes.NOT_READ,
             ("n", "1"): changes.signature_read("UNAVAILABLE", "MLflow did not answer"),
             ("o", "1"): changes.signature_read("ABSENT", "its model was logged without a signature")}
    for (name, version), r in reads.items():
        state = changes.model_version_state(mo.model_version(name, version), [], None, r)
        known.restore("MODEL_VERSION", model_version_key(name, version), Known.summary("MODEL_VERSION", state))
    signatures = Signatures(reader, known)  # type: ignore[arg-type]
    assert [signatures.known(mo.model_version(n, v)) for n, v in reads] == list(reads.values())
    assert reader.asked == []
    assert signatures.unread_models() == {"m": ["2"], "n": ["1"]}
    assert Signatures(reader, known, enabled=False).unread_models() == {}
    assert Signatures(reader, known, enabled=False).known(mo.model_version("m", "1")) == changes.NOT_READ


def test_a_step_of_the_features_pass_reads_its_own_versions_only() -> None:
    """A step reads every version of its models (for the model's features) but asks MLflow only for the
    signatures of the versions it took; a model with more versions due than a step spans several steps."""
    from connector.pipeline.producer import FeaturesPass

    reader = CountingReader({("m", str(v)): mlmodel([{"type": "double", "name": "x", "required": True}])
                             for v in range(1, 13)})
    known = Known()
    for v in range(1, 13):
        state = changes.model_version_state(mo.model_version("m", str(v)), [], None, changes.NOT_READ)
        known.restore("MODEL_VERSION", model_version_key("m", str(v)), Known.summary("MODEL_VERSION", state))
    state = changes.model_version_state(mo.model_version("a", "1"), [], None, changes.NOT_READ)
    known.restore("MODEL_VERSION", model_version_key("a", "1"), Known.summary("MODEL_VERSION", state))
    signatures = Signatures(reader, known)  # type: ignore[arg-type]
    due = signatures.unread_models()
    assert due == {"a": ["1"], "m": [str(v) for v in range(1, 13)]}  # versions by number: 2 before 10
    features = FeaturesPass(due, "snapshot 1", versions=13)
    first = features.next_step(5)
    assert first == [("a", "1"), ("m", "1"), ("m", "2"), ("m", "3"), ("m", "4")]
    signatures.only = {model_version_key(n, v) for n, v in first}
    versions = [mo.model_version("m", str(v)) for v in range(1, 13)]
    signatures.prefetch(versions)
    reads = [signatures.of(v) for v in versions]
    assert sorted(reader.asked) == [("m", "1"), ("m", "2"), ("m", "3"), ("m", "4")]
    assert [r["signature_status"] for r in reads] == ["PRESENT"] * 4 + [None] * 8
    features.done(first)
    assert features.remaining == 8 and "a" not in features.due
    assert features.next_step(5) == [("m", str(v)) for v in range(5, 10)]
    features.done(features.next_step(100))
    assert features.due == {} and features.remaining == 0
