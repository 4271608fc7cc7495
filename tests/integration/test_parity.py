"""Parity with DataHub's own batch `MLflowSource` on a real MLflow server.

DataHub's original source (`datahub ingest`, in its own virtualenv: see tests/original_source.py)
and the connector (`mlflow-datahub snapshot` on the real stack, then `dump` of the MCP topic) read
the same demo MLflow. Both outputs are compared by (entity URN, aspect name) -> aspect JSON:

* every (URN, aspect) of the original is in the connector's output with the same entity type and
  change type, and an equal value -- or the difference is one of DEVIATIONS, the deliberate fixes
  marked FIX(...) in connector/mapping.py; each deviation asserts the original's value of the one
  field that differs, the connector's intended value of it, and that the rest of the aspect is equal;
* per entity type, the original's URNs are a subset of the connector's;
* every (URN, aspect) the connector emits and the original does not is explained by EXTRAS.

The MCP topic can hold an aspect more than once (stage tags are written by every model version,
from several partitions): the last record counts, as DataHub upserts them, and all tagProperties
records of one tag must be equal.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from datahub.api.entities.dataprocess.dataprocess_instance import DataProcessInstance
from datahub.emitter.mce_builder import datahub_guid, make_ml_model_group_urn, make_ml_model_urn
from datahub.emitter.mcp_builder import ExperimentKey
from datahub.metadata.urns import DatasetUrn
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.utils.rest_utils import MlflowHostCreds

from connector.devstack.mlflow_server import MlflowServer
from tests.conftest import ConfigFactory, run_cli
from tests.original_source import OriginalSourceMissing, datahub_cli, run_original

PLATFORM = "mlflow"
Key = tuple[str, str]  # (entity URN, aspect name)
Aspect = dict[str, Any]
Records = list[dict[str, Any]]


# ---- the two outputs ---------------------------------------------------------------------------


@dataclass
class Output:
    """One side's file-sink records, by (URN, aspect); the last record of a key counts."""

    aspects: dict[Key, Aspect] = field(default_factory=dict)
    occurrences: dict[Key, list[Aspect]] = field(default_factory=lambda: defaultdict(list))
    entity_types: dict[str, str] = field(default_factory=dict)
    change_types: dict[Key, str] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Records, side: str) -> Output:
        out = cls()
        for r in records:
            assert set(r["aspect"]) == {"json"}, f"{side}: aspect of {r['entityUrn']} not serialised as JSON: {r}"
            key = (r["entityUrn"], r["aspectName"])
            out.aspects[key] = r["aspect"]["json"]
            out.occurrences[key].append(r["aspect"]["json"])
            out.change_types[key] = r["changeType"]
            previous = out.entity_types.setdefault(r["entityUrn"], r["entityType"])
            assert previous == r["entityType"], f"{side}: {r['entityUrn']} is a {previous} and a {r['entityType']}"
        return out

    def urns_by_type(self) -> dict[str, set[str]]:
        by_type: dict[str, set[str]] = defaultdict(set)
        for urn, entity_type in self.entity_types.items():
            by_type[entity_type].add(urn)
        return by_type


# ---- what MLflow holds (read independently of both sides) --------------------------------------


@dataclass(frozen=True)
class RunFacts:
    run_id: str
    experiment_id: str
    lifecycle_stage: str
    start_time: int | None
    end_time: int | None
    tags: dict[str, str]
    dataset_inputs: int
    versions: tuple[str, ...]  # model URNs of the versions the run produced


@dataclass
class Facts:
    tracking_uri: str
    env: str = "PROD"
    separator: str = "_"
    base_external_url: str | None = None
    deleted_experiments: set[str] = field(default_factory=set)  # container URNs
    runs: dict[str, RunFacts] = field(default_factory=dict)  # by run URN
    aliases: dict[str, list[str]] = field(default_factory=dict)  # by model (version) URN
    version_users: dict[str, str | None] = field(default_factory=dict)  # by model URN
    first_latest_version: dict[str, str | None] = field(default_factory=dict)  # by group URN, MLflow's order
    max_version: dict[str, str | None] = field(default_factory=dict)  # by group URN

    def model_urn(self, name: str, version: str) -> str:
        return make_ml_model_urn(PLATFORM, f"{name}{self.separator}{version}", self.env)

    def group_urn(self, name: str) -> str:
        return make_ml_model_group_urn(PLATFORM, name, self.env)


def run_urn(run_id: str) -> str:
    return str(DataProcessInstance(id=run_id, orchestrator=PLATFORM).urn)


def experiment_urn(name: str) -> str:
    return ExperimentKey(platform=f"urn:li:dataPlatform:{PLATFORM}", id=name).as_urn()


def user_urn(user_id: str) -> str:
    return f"urn:li:platformResource:{datahub_guid({'platform': PLATFORM, 'user': user_id})}"


def read_facts(tracking_uri: str, recipe: dict[str, Any]) -> Facts:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # The registry through MLflow's REST store: the MLflow 3 client adds a prompt filter that an
    # MLflow 2.x server answers with nothing.
    registry = RegistryRestStore(lambda: MlflowHostCreds(tracking_uri))
    facts = Facts(tracking_uri, env=recipe.get("env", "PROD"), separator=recipe.get("model_name_separator", "_"),
                  base_external_url=recipe.get("base_external_url"))
    experiments = client.search_experiments(view_type=ViewType.ALL, max_results=1000)
    facts.deleted_experiments = {experiment_urn(e.name) for e in experiments if e.lifecycle_stage == "deleted"}
    versions = registry.search_model_versions(max_results=10000)
    by_run: dict[str, list[str]] = defaultdict(list)
    for v in versions:
        urn = facts.model_urn(v.name, str(v.version))
        facts.version_users[urn] = v.user_id or None
        if v.run_id:
            by_run[v.run_id].append(urn)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL, max_results=10000)
    for r in runs:
        facts.runs[run_urn(r.info.run_id)] = RunFacts(
            run_id=r.info.run_id, experiment_id=r.info.experiment_id, lifecycle_stage=r.info.lifecycle_stage,
            start_time=r.info.start_time, end_time=r.info.end_time, tags=dict(r.data.tags),
            dataset_inputs=len(r.inputs.dataset_inputs), versions=tuple(by_run[r.info.run_id]),
        )
    for model in registry.search_registered_models(max_results=1000):
        group = facts.group_urn(model.name)
        numbers = [int(v.version) for v in versions if v.name == model.name]
        facts.max_version[group] = str(max(numbers)) if numbers else None
        facts.first_latest_version[group] = str(model.latest_versions[0].version) if model.latest_versions else None
        for alias, version in model.aliases.items():
            facts.aliases.setdefault(facts.model_urn(model.name, str(version)), []).append(alias)
    return facts


# ---- deliberate deviations ---------------------------------------------------------------------

# A check gets (facts, URN, original aspect, our aspect). It asserts the original's value of the
# deviating field (as DataHub 1.7.0.17 writes it) and the connector's intended value; it returns
# whether the two values actually differ. The field is then removed from both sides and the rest
# of the aspect must be equal.
Check = Callable[[Facts, str, Aspect, Aspect], bool]


def _run_tags(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    assert original["customProperties"] == {}, "the original writes run tags now"
    assert ours["customProperties"] == f.runs[urn].tags, f"ours are not the run's MLflow tags {f.runs[urn].tags}"
    return original["customProperties"] != ours["customProperties"]


def _run_url(base: str, run: RunFacts) -> str:
    return f"{base.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"


def _run_external_url(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    run = f.runs[urn]
    assert original["externalUrl"] == _run_url(f.tracking_uri, run), "original: not under tracking_uri"
    assert ours["externalUrl"] == _run_url(f.base_external_url or f.tracking_uri, run), "ours: wrong URL"
    return original["externalUrl"] != ours["externalUrl"]


def _all_model_versions(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    produced = f.runs[urn].versions
    assert len(original["outputEdges"]) == 1 and original["outputEdges"][0]["destinationUrn"] in produced, (
        f"original: not one edge to one of the run's versions {produced}")
    ours_edges = ours["outputEdges"]
    assert all(set(e) == {"destinationUrn"} for e in ours_edges), "ours: edges with more than destinationUrn"
    assert sorted(e["destinationUrn"] for e in ours_edges) == sorted(produced), (
        f"ours: not one edge per version the run produced: {produced}")
    return original["outputEdges"] != ours_edges


def _latest_version(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    assert original["version"].get("versionTag") == f.first_latest_version[urn], (
        f"original: not the first of latest_versions {f.first_latest_version[urn]!r}")
    assert ours["version"].get("versionTag") == f.max_version[urn], (
        f"ours: not the newest version {f.max_version[urn]!r}")
    return original["version"].get("versionTag") != ours["version"].get("versionTag")


def _version_aliases(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    assert original["aliases"] == [], "the original writes aliases now"
    expected = sorted(f.aliases.get(urn, []))
    assert all(set(a) == {"versionTag"} for a in ours["aliases"]), "ours: alias with more than versionTag"
    assert sorted(a["versionTag"] for a in ours["aliases"]) == expected, f"ours: not the aliases {expected}"
    return original["aliases"] != ours["aliases"]


def _version_creator(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    user = f.version_users[urn]
    if user is None:
        assert "actor" not in original["created"] and "actor" not in ours["created"], "an actor without user id"
        return False
    assert original["created"]["actor"] == f"urn:li:platformResource:{user}", "original: not the raw user id"
    assert ours["created"]["actor"] == user_urn(user), f"ours: not the user resource {user_urn(user)}"
    return True


def dataset_env_urn(f: Facts, urn: str) -> str:
    """The original's dataset URN (always PROD) as the connector names it (in `env`)."""
    if not urn.startswith("urn:li:dataset:"):
        return urn
    dataset = DatasetUrn.from_string(urn)
    assert dataset.env == "PROD", f"the original now puts datasets in {dataset.env}: {urn}"
    return str(DatasetUrn(platform=dataset.platform, name=dataset.name, env=f.env))


def _dataset_env_inputs(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    expected = [{**e, "destinationUrn": dataset_env_urn(f, e["destinationUrn"])} for e in original["inputEdges"]]
    assert ours["inputEdges"] == expected, f"ours: not {expected}"
    return original["inputEdges"] != ours["inputEdges"]


def _dataset_env_upstreams(f: Facts, urn: str, original: Aspect, ours: Aspect) -> bool:
    expected = [{**u, "dataset": dataset_env_urn(f, u["dataset"])} for u in original["upstreams"]]
    assert ours["upstreams"] == expected, f"ours: not {expected}"
    return original["upstreams"] != ours["upstreams"]


@dataclass(frozen=True)
class Deviation:
    fix: str  # the FIX(<name>) in connector/mapping.py
    entity_type: str
    aspect: str  # "*": every aspect of the entity
    field: str  # dotted path of the one field that differs ("entityUrn": the URN, see dataset_env_urn)
    description: str
    check: Check | None  # None for the URN, which `compare` maps with dataset_env_urn


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("run-tags", "dataProcessInstance", "dataProcessInstanceProperties", "customProperties",
              "original: always {} (it reads a `tags` attribute MLflow runs do not have); "
              "ours: the run's MLflow tags, system tags (mlflow.*) included", _run_tags),
    Deviation("run-external-url", "dataProcessInstance", "dataProcessInstanceProperties", "externalUrl",
              "original: <tracking_uri>/#/experiments/<id>/runs/<run id>, base_external_url ignored; "
              "ours: the same path under base_external_url when it is set (equal otherwise)", _run_external_url),
    Deviation("all-model-versions", "dataProcessInstance", "dataProcessInstanceOutput", "outputEdges",
              "original: one edge, to the first version MLflow's search returns for the run; "
              "ours: one edge per version the run produced", _all_model_versions),
    Deviation("latest-version", "mlModelGroup", "mlModelGroupProperties", "version.versionTag",
              "original: the first of MLflow's per-stage latest_versions; ours: the newest (highest) version; "
              "both absent for a model without versions", _latest_version),
    Deviation("version-aliases", "mlModel", "versionProperties", "aliases",
              "original: always [] (MLflow's version search returns no aliases); "
              "ours: one {versionTag: alias} per alias of the registered model pointing at the version",
              _version_aliases),
    Deviation("version-creator", "mlModel", "mlModelProperties", "created.actor",
              "original: urn:li:platformResource:<MLflow user id>, an entity nobody creates; ours: the user's "
              "platformResource that runs point at (guid of platform+user); both absent without user id "
              "(as in the demo: MLflow without authentication stores no user id for versions)", _version_creator),
    Deviation("dataset-env", "dataset", "*", "entityUrn",
              "original: dataset URNs always in PROD; ours: in the recipe's env (the aspects are otherwise equal)",
              None),
    Deviation("dataset-env", "dataProcessInstance", "dataProcessInstanceInput", "inputEdges",
              "original: edges to the PROD dataset URNs; ours: the same edges to the datasets in the recipe's env",
              _dataset_env_inputs),
    Deviation("dataset-env", "dataset", "upstreamLineage", "upstreams",
              "original: upstream (hosted) datasets in PROD; ours: in the recipe's env", _dataset_env_upstreams),
)


def _drop(aspect: Aspect, path: str) -> Aspect:
    out = copy.deepcopy(aspect)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node.get(p, {})
    node.pop(last, None)
    return out


# ---- what the connector emits beyond the original -----------------------------------------------


@dataclass(frozen=True)
class Extra:
    fix: str | None  # the FIX(<name>) in connector/mapping.py it comes from, if any
    reason: str
    explains: Callable[[Facts, str, str, Aspect], bool]  # (facts, URN, aspect name, value)


# What the connector writes for an experiment and for a run (an active one, as the original does).
EXPERIMENT_ASPECTS = {"containerProperties", "dataPlatformInstance", "subTypes", "browsePathsV2", "status"}
RUN_ASPECTS = {"dataProcessInstanceProperties", "container", "dataProcessInstanceOutput", "mlTrainingRunProperties",
               "dataProcessInstanceRunEvent", "dataPlatformInstance", "subTypes", "dataProcessInstanceInput", "status"}


def _deleted_experiment(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    return (urn in f.deleted_experiments and aspect in EXPERIMENT_ASPECTS
            and (aspect != "status" or value == {"removed": True}))


def _deleted_run(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    run = f.runs.get(urn)
    return (run is not None and run.lifecycle_stage == "deleted" and aspect in RUN_ASPECTS
            and (aspect != "status" or value == {"removed": True}))


def _started_event(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    run = f.runs.get(urn)
    return (aspect == "dataProcessInstanceRunEvent" and run is not None and run.end_time is None
            and value.get("status") == "STARTED" and value.get("timestampMillis") == run.start_time
            and "result" not in value and "durationMillis" not in value)


def _empty_outputs(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    run = f.runs.get(urn)
    return (aspect == "dataProcessInstanceOutput" and run is not None and not run.versions
            and value == {"outputs": [], "outputEdges": []})


def _empty_inputs(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    run = f.runs.get(urn)
    return (aspect == "dataProcessInstanceInput" and run is not None and not run.dataset_inputs
            and value == {"inputs": [], "inputEdges": []})


def _creator_resource(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    users = {u for u in f.version_users.values() if u}
    return any(urn == user_urn(u) for u in users) and (
        value == {"removed": False} if aspect == "status"
        else aspect == "platformResourceInfo" and value["resourceType"] == "user" and value["primaryKey"] in users)


def _training_data(f: Facts, urn: str, aspect: str, value: Aspect) -> bool:
    """Beyond the original: a version with a run names the datasets the run consumed (the demo's runs
    have one dataset input or none; the exact URNs are tested in tests/integration/test_signatures_end_to_end.py)."""
    runs = [r for r in f.runs.values() if urn in r.versions]
    return (aspect == "mlModelTrainingData" and len(runs) == 1
            and len(value["trainingData"]) == runs[0].dataset_inputs
            and all(d["dataset"].startswith("urn:li:dataset:") for d in value["trainingData"]))


EXTRAS: tuple[Extra, ...] = (
    Extra("deleted-experiments", "a deleted experiment's container, status removed=true "
          "(the original lists active experiments only)", _deleted_experiment),
    Extra("deleted-runs", "a run MLflow marks deleted (also those of a deleted experiment), status removed=true "
          "(the original lists active runs only)", _deleted_run),
    Extra("running-runs", "STARTED run event at start_time of a run in progress "
          "(the original writes no run event for it)", _started_event),
    Extra("all-model-versions", "empty output edges of a run without versions "
          "(so that a deleted version's edge disappears; the original writes no aspect)", _empty_outputs),
    Extra(None, "empty input edges of a run without dataset inputs "
          "(so that a removed input's edge disappears; the original writes no aspect)", _empty_inputs),
    Extra("version-creator", "the user resource a version's creator points at", _creator_resource),
    Extra(None, "a version's training data: the datasets of its run's dataProcessInstanceInput "
          "(beyond the original, which leaves mlModelTrainingData empty)", _training_data),
)


# ---- the comparison ------------------------------------------------------------------------------


@dataclass
class Comparison:
    failures: list[str] = field(default_factory=list)
    differed: Counter[str] = field(default_factory=Counter)  # FIX name -> aspects that differ in its field
    # aspect -> (URN, what explains it)
    extras: dict[str, list[tuple[str, Extra]]] = field(default_factory=lambda: defaultdict(list))
    records: tuple[int, int] = (0, 0)  # original, connector
    duplicates: Counter[str] = field(default_factory=Counter)  # aspect -> extra records on the topic

    def report(self) -> str:
        lines = [f"records: original {self.records[0]}, connector {self.records[1]}",
                 "deviations (aspects whose FIX field differs from the original):"]
        for fix, n in sorted(self.differed.items()):
            lines.append(f"  FIX({fix}): {n}")
            lines += [f"    {d.aspect}.{d.field}: {d.description}" for d in DEVIATIONS if d.fix == fix]
        lines.append("extra (URN, aspect) pairs of the connector, by aspect:")
        for aspect, items in sorted(self.extras.items()):
            lines.append(f"  {aspect}: {len(items)}")
            for urn, x in sorted(items, key=lambda i: i[0]):
                lines.append(f"    {urn}  <- {f'FIX({x.fix}): ' if x.fix else ''}{x.reason}")
        lines.append("aspects written more than once on the MCP topic (last one counts): "
                     + (", ".join(f"{a} +{n}" for a, n in sorted(self.duplicates.items())) or "none"))
        if self.failures:
            lines.append(f"FAILURES ({len(self.failures)}):")
            lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


def _matching(entity_type: str, aspect: str) -> list[Deviation]:
    return [d for d in DEVIATIONS if d.entity_type == entity_type and d.aspect == aspect and d.check is not None]


def compare(original_records: Records, our_records: Records, facts: Facts) -> Comparison:
    original = Output.of(original_records, "original")
    ours = Output.of(our_records, "connector")
    result = Comparison(records=(len(original_records), len(our_records)))
    fail = result.failures.append

    def our_urn(urn: str) -> str:
        # FIX(dataset-env) renames the original's dataset URNs; no other URN differs.
        return dataset_env_urn(facts, urn) if original.entity_types[urn] == "dataset" else urn

    # Per entity type, the original's URNs are a subset of ours.
    ours_by_type = ours.urns_by_type()
    for entity_type, urns in sorted(original.urns_by_type().items()):
        missing = {our_urn(u) for u in urns} - ours_by_type.get(entity_type, set())
        if missing:
            fail(f"{entity_type}: URNs of the original missing from the connector's output: {sorted(missing)}")
    if any(t == "dataset" for t in original.entity_types.values()) and facts.env != "PROD":
        result.differed["dataset-env"] += 1

    # Every (URN, aspect) of the original: present, and equal but for the deviations.
    for (urn, aspect), value in sorted(original.aspects.items()):
        key = (our_urn(urn), aspect)
        if key not in ours.aspects:
            fail(f"missing: {key[0]} {aspect} (original: {json.dumps(value, sort_keys=True)})")
            continue
        mine = ours.aspects[key]
        change_type = original.change_types[(urn, aspect)]
        if ours.change_types[key] != change_type:
            fail(f"{key[0]} {aspect}: changeType {ours.change_types[key]}, original {change_type}")
        left, right = value, mine
        for deviation in _matching(original.entity_types[urn], aspect):
            assert deviation.check is not None
            try:
                if deviation.check(facts, urn, value, mine):
                    result.differed[deviation.fix] += 1
            except (AssertionError, KeyError, TypeError, AttributeError) as e:
                fail(f"FIX({deviation.fix}) {deviation.aspect}.{deviation.field} of {urn}: {e}\n"
                     f"      original: {json.dumps(value, sort_keys=True)}\n"
                     f"      ours:     {json.dumps(mine, sort_keys=True)}")
            left, right = _drop(left, deviation.field), _drop(right, deviation.field)
        if left != right:
            fail(f"differs: {key[0]} {aspect}\n      original: {json.dumps(value, sort_keys=True)}\n"
                 f"      ours:     {json.dumps(mine, sort_keys=True)}")

    # Everything else we emit is explained.
    expected_keys = {(our_urn(u), a) for u, a in original.aspects}
    for (urn, aspect), value in sorted(ours.aspects.items()):
        if (urn, aspect) in expected_keys:
            continue
        why = next((x for x in EXTRAS if x.explains(facts, urn, aspect, value)), None)
        if why is None:
            fail(f"unexplained extra: {urn} {aspect} = {json.dumps(value, sort_keys=True)}")
        else:
            result.extras[aspect].append((urn, why))

    # Repeated records of one key: the last counts; the stage tags' properties never disagree.
    for (urn, aspect), values in sorted(ours.occurrences.items()):
        if len(values) > 1:
            result.duplicates[aspect] += len(values) - 1
            if aspect == "tagProperties" and any(v != values[0] for v in values):
                fail(f"{urn} tagProperties differ between its {len(values)} records: {values}")
    return result


# ---- running both sides --------------------------------------------------------------------------


def _connector_output(config: Path, out: Path) -> Records:
    result = run_cli("snapshot", "-c", str(config))
    assert result.returncode == 0, f"snapshot failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    result = run_cli("dump", "-c", str(config), "--out", str(out))
    assert result.returncode == 0, f"dump failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def parity(server: MlflowServer, make_config: ConfigFactory, workdir: Path, recipe: dict[str, Any]
           ) -> tuple[Comparison, Output, Facts]:
    """Both sides on `server` with the same recipe fields; the comparison, our output and MLflow's facts."""
    missing = None
    try:
        datahub_cli()
    except OriginalSourceMissing as e:
        missing = str(e)
    if missing:  # a skipped parity test would hide the check: fail
        pytest.fail(missing, pytrace=False)
    config, _ = make_config(server.uri, {"source": {"config": recipe}} if recipe else None)

    def timed(fn: Callable[..., Records], *args: Any) -> tuple[Records, float]:
        started = time.monotonic()
        return fn(*args), time.monotonic() - started

    with ThreadPoolExecutor(max_workers=1) as pool:  # the original runs while the connector does
        original_run = pool.submit(timed, run_original, server.uri, workdir / "original", recipe)
        ours, our_seconds = timed(_connector_output, config, workdir / "connector.json")
        original, original_seconds = original_run.result()
    facts = read_facts(server.uri, recipe)
    comparison = compare(original, ours, facts)
    print(f"seconds: original {original_seconds:.1f}, connector snapshot + dump {our_seconds:.1f}")
    print(comparison.report())
    return comparison, Output.of(ours, "connector"), facts


EXPECTED_DIFFERENCES = {"run-tags", "all-model-versions", "latest-version", "version-aliases"}
EXPECTED_EXTRAS = {
    # aspect -> the reasons (by FIX) the demo content produces
    "status": {"deleted-experiments", "deleted-runs"},
    "dataProcessInstanceRunEvent": {"running-runs"},
}


def _check_demo_values(ours: Output, facts: Facts) -> None:
    """Spot checks of the fixes with the demo's literal values (connector/demo.py)."""
    v1 = facts.model_urn("demo classifier", "1")
    assert ours.aspects[(v1, "versionProperties")]["aliases"] == [{"versionTag": "champion"}]
    group = facts.group_urn("demo classifier")
    assert ours.aspects[(group, "mlModelGroupProperties")]["version"]["versionTag"] == "5"
    assert "versionTag" not in ours.aspects[(facts.group_urn("model without versions"),
                                             "mlModelGroupProperties")]["version"]
    finished = next(urn for urn, r in facts.runs.items() if r.tags.get("mlflow.runName") == "finished run")
    assert ours.aspects[(finished, "dataProcessInstanceProperties")]["customProperties"]["owner"] == "alice"
    assert sorted(e["destinationUrn"] for e in ours.aspects[(finished, "dataProcessInstanceOutput")]["outputEdges"]
                  ) == sorted([facts.model_urn("demo classifier", "1"), facts.model_urn("demo classifier", "4")])
    running = next(urn for urn, r in facts.runs.items() if r.tags.get("mlflow.runName") == "running run")
    assert ours.aspects[(running, "dataProcessInstanceRunEvent")]["status"] == "STARTED"
    retired = experiment_urn("retired experiment")
    assert ours.aspects[(retired, "status")] == {"removed": True}


def _assert_parity(comparison: Comparison, expected_differences: set[str]) -> None:
    assert not comparison.failures, "parity with DataHub's MLflowSource broken:\n" + "\n".join(comparison.failures)
    assert set(comparison.differed) == expected_differences, (
        f"fixes seen differing {sorted(comparison.differed)}, expected {sorted(expected_differences)}")
    for aspect, fixes in EXPECTED_EXTRAS.items():
        seen = {x.fix for _, x in comparison.extras.get(aspect, [])}
        assert fixes <= seen, f"{aspect}: extras for {sorted(fixes - seen)} expected, not seen"


def test_parity_with_datahub_mlflow_source(demo_mlflow: MlflowServer, make_config: ConfigFactory,
                                           tmp_path: Path) -> None:
    comparison, ours, facts = parity(demo_mlflow, make_config, tmp_path, {})
    _assert_parity(comparison, EXPECTED_DIFFERENCES)
    _check_demo_values(ours, facts)
    assert comparison.duplicates["tagProperties"] > 0, "stage tags were expected from several model versions"


def test_parity_with_non_default_recipe(demo_mlflow: MlflowServer, make_config: ConfigFactory,
                                        tmp_path: Path) -> None:
    recipe = {"env": "DEV", "model_name_separator": "-", "base_external_url": "http://mlflow.example.com"}
    comparison, ours, facts = parity(demo_mlflow, make_config, tmp_path, recipe)
    _assert_parity(comparison, EXPECTED_DIFFERENCES | {"dataset-env", "run-external-url"})
    _check_demo_values(ours, facts)
    assert ("urn:li:dataset:(urn:li:dataPlatform:mlflow,iris training set,DEV)", "datasetProperties") in ours.aspects
    v1 = "urn:li:mlModel:(urn:li:dataPlatform:mlflow,demo classifier-1,DEV)"
    assert (v1, "mlModelProperties") in ours.aspects
    finished = next(urn for urn, r in facts.runs.items() if r.tags.get("mlflow.runName") == "finished run")
    url = ours.aspects[(finished, "dataProcessInstanceProperties")]["externalUrl"]
    assert url.startswith("http://mlflow.example.com/#/experiments/"), url
