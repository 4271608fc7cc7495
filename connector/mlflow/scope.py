"""Which MLflow objects the connector reads (`experiment_pattern`, `model_pattern`, `max_run_age_days`).
Pure: an entity state in, in scope or not out.

Applied alike to snapshots, incremental cycles, webhook reads and deletions: what is out of scope is
never published, and what leaves the scope (a pattern changed, a run aged out) is stale, as in
DataHub's stateful ingestion: the producer publishes its DELETE, and the consumer soft-deletes it.
Experiments and their runs follow `experiment_pattern` (by experiment name), registered models and
their versions follow `model_pattern` (by model name), LoggedModels follow their experiment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connector.contract.events import Entity, EntityKind

if TYPE_CHECKING:
    from datahub.configuration.common import AllowDenyPattern

    from connector.config import ConnectorConfig

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Scope:
    experiments: AllowDenyPattern | None = None  # None: every experiment
    models: AllowDenyPattern | None = None
    max_run_age_ms: int | None = None

    @staticmethod
    def of(cfg: ConnectorConfig) -> Scope:
        c = cfg.mlflow
        everything = [".*"]
        return Scope(
            experiments=None if c.experiment_pattern.allow == everything and not c.experiment_pattern.deny
            else c.experiment_pattern.to_datahub(),
            models=None if c.model_pattern.allow == everything and not c.model_pattern.deny
            else c.model_pattern.to_datahub(),
            max_run_age_ms=int(c.max_run_age_days * DAY_MS) if c.max_run_age_days else None,
        )

    @property
    def everything(self) -> bool:
        return self.experiments is None and self.models is None and self.max_run_age_ms is None

    def experiment(self, name: str) -> bool:
        return self.experiments is None or self.experiments.allowed(name)

    def model(self, name: str) -> bool:
        return self.models is None or self.models.allowed(name)

    def includes(self, kind: EntityKind, entity: Entity, now_ms: int,
                 experiment_names: Mapping[str, str] | None = None) -> bool:
        e: Any = entity
        if kind == "EXPERIMENT":
            return self.experiment(e["name"])
        if kind == "RUN":
            if self.max_run_age_ms is not None and (e["start_time"] or 0) < now_ms - self.max_run_age_ms:
                return False
            return self.experiment(e["experiment_name"])
        if kind in ("REGISTERED_MODEL", "MODEL_VERSION"):
            return self.model(e["name"])
        if kind == "LOGGED_MODEL":
            name = (experiment_names or {}).get(e["experiment_id"])
            return name is None or self.experiment(name)
        return True
