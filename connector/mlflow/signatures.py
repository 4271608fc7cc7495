"""Model signatures: the `MLmodel` file of a model version's logged model, read once per version ever.

A model version is immutable in MLflow (its source, and so its logged model, never change), so what
reading its signature found is kept in the version's summary (`Known.signatures`, restored from the
producer-offsets topic on start-up): later snapshots and cycles, and restarts, make no artifact
request for it. Only UNAVAILABLE (MLflow did not answer) is read again, after the next snapshot or
start-up. ABSENT (no signature) and UNREADABLE (no permission, no such file, a registry MLflow's
artifact route cannot serve) are final; each is a warning, once per version, counted in `warnings`
and the metric `mlflow_datahub_signature_warnings`.

A complete snapshot reads no artifact (`known`): it publishes what was read before, and the versions
it met unread are read after it, a registered model at a time (`unread_models`, the producer's
features pass), so that a first snapshot, or one after a bulk import, is not held up by an artifact
request per version. Cycles and targeted reads read a new version's signature at once (`of`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
from mlflow.exceptions import MlflowException

from connector.contract.events import model_version_key, signature_to_read
from connector.errors import first_line
from connector.mlflow.entities import NOT_READ, SignatureRead, parse_mlmodel, signature_read
from connector.mlflow.incremental import Known
from connector.mlflow.reader import ArtifactUnreadable, MlflowReader, MlflowUnavailable, RequestFailed
from connector.observability.metrics import METRICS

log = logging.getLogger("connector.signatures")

PARALLEL_READS = 4  # artifact requests at once when many versions are new (a first snapshot)
LOGGED_PER_PASS = 10  # warning lines per snapshot or cycle; the rest are counted (the snapshot's summary line)


class Signatures:
    """What reading each model version's signature found: from `Known` when it was read before,
    else read now (one artifact request)."""

    def __init__(self, reader: MlflowReader, known: Known, enabled: bool = True) -> None:
        self.reader = reader
        self.known_reads = known
        self.enabled = enabled
        self.requests = 0  # artifact requests made (the bench and the tests count them)
        self.warnings: Counter[str] = Counter()  # status -> versions read without features
        self._read: dict[str, SignatureRead] = {}  # read by this process, not yet in `Known` (not committed)
        self.lines_logged = 0  # warning lines of this pass (a cycle's, a snapshot's, or a features pass's)
        # Version keys whose signatures may be read now (None: any): a step of the features pass reads its own
        # versions only, although it reads every version of their models.
        self.only: set[str] | None = None

    def begin(self) -> None:
        """A new snapshot or cycle: what was read is in `Known` by now (or is read again)."""
        self._read.clear()
        self.lines_logged = 0

    def _found(self, key: str) -> SignatureRead:
        return self._read.get(key) or self.known_reads.signatures.get(key) or NOT_READ

    def cached(self, name: str, version: str) -> SignatureRead | None:
        """What was read, unless it is still to be read (never read, or no answer)."""
        found = self._found(model_version_key(name, version))
        return None if signature_to_read(found["signature_status"]) else found

    def known(self, version: MlflowModelVersion) -> SignatureRead:
        """What was read of the version's signature before (UNAVAILABLE included), without reading it:
        NOT_READ when it never was."""
        if not self.enabled:
            return NOT_READ
        return self._found(model_version_key(version.name, str(version.version)))

    def unread_models(self) -> dict[str, list[str]]:
        """Registered model name -> its published versions whose signature was never read (or not for want
        of an answer), models in name order, versions in number order: what the features pass reads."""
        if not self.enabled:
            return {}
        unread: dict[str, list[str]] = {}
        for name, versions in sorted(self.known_reads.versions_by_model.items()):
            wanted = sorted((v for v in versions if self.cached(name, v) is None), key=_number)
            if wanted:
                unread[name] = wanted
        return unread

    def of(self, version: MlflowModelVersion) -> SignatureRead:
        """The version's signature, read if it never was (or MLflow did not answer last time)."""
        name, number = version.name, str(version.version)
        if not self.enabled:
            return NOT_READ
        found = self.cached(name, number)
        if found is not None:
            return found
        if self.only is not None and model_version_key(name, number) not in self.only:
            return self.known(version)  # another step's
        found = self._fetch(name, number)
        self._read[model_version_key(name, number)] = found
        return found

    def prefetch(self, versions: Iterable[MlflowModelVersion]) -> None:
        """Read the signatures of the versions not read yet, a few at a time (a first snapshot meets
        every version new)."""
        if not self.enabled:
            return
        wanted = [v for v in versions if self.cached(v.name, str(v.version)) is None
                  and (self.only is None or model_version_key(v.name, str(v.version)) in self.only)]
        if len(wanted) < 2:
            return
        with ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="mlflow-signatures") as pool:
            for version, found in zip(wanted, pool.map(lambda v: self._fetch(v.name, str(v.version)), wanted),
                                      strict=True):
                self._read[model_version_key(version.name, str(version.version))] = found

    def _fetch(self, name: str, version: str) -> SignatureRead:
        self.requests += 1
        try:
            found = parse_mlmodel(self.reader.model_version_file(name, version))
        except (ArtifactUnreadable, RequestFailed) as e:
            found = signature_read("UNREADABLE", first_line(e, 300))
        except (MlflowUnavailable, MlflowException) as e:  # no useful answer within the retries
            found = signature_read("UNAVAILABLE", first_line(e, 300))
        status = found["signature_status"]
        if status != "PRESENT":
            self.warnings[str(status)] += 1
            METRICS.signature_warnings.labels(str(status).lower()).inc()
            self.lines_logged += 1
            if self.lines_logged <= LOGGED_PER_PASS:
                log.warning("model %r version %s: no features (signature %s: %s)%s", name, version,
                            str(status).lower(), found["signature_reason"],
                            "; read again after the next snapshot" if status == "UNAVAILABLE" else "")
            if self.lines_logged == LOGGED_PER_PASS:
                log.warning("further model versions without features are counted, not logged one by one, until "
                            "the next pass (mlflow_datahub_signature_warnings_total)")
        return found


def _number(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)
