"""DataHub's own batch `MLflowSource`, run as `datahub ingest` in its own virtualenv.

The original pins mlflow-skinny<2.21, which cannot share a virtualenv with the connector's MLflow 3,
so it lives in `.cache/original-venv` (created by `make test`; DATAHUB_ORIGINAL_VENV overrides the
location). Its output is DataHub's file-sink JSON, the same format as `mlflow-datahub dump`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".cache" / "original-venv"
INSTALL = ("python3 -m venv .cache/original-venv && .cache/original-venv/bin/pip install "
           "'acryl-datahub[mlflow]==1.7.0.17' 'sqlalchemy<2.1'")


class OriginalSourceMissing(Exception):
    """The virtualenv with DataHub's original MLflow source is not installed."""


def original_venv() -> Path:
    return Path(os.environ.get("DATAHUB_ORIGINAL_VENV") or DEFAULT_VENV)


def datahub_cli() -> Path:
    """The original's `datahub` command; raises OriginalSourceMissing with how to install it."""
    cli = original_venv() / "bin" / "datahub"
    if not cli.exists():
        raise OriginalSourceMissing(
            f"DataHub's original MLflow source is not installed: {cli} does not exist. "
            f"Run the tests with `make test` (it creates the virtualenv), or create it by hand: {INSTALL}"
        )
    return cli


def run_original(tracking_uri: str, workdir: Path, extra_config: dict[str, Any] | None = None,
                 timeout: float = 300) -> list[dict[str, Any]]:
    """Run `datahub ingest` with the mlflow source and a file sink; return the file sink's records.

    `extra_config` is merged into the source's `config` (env, model_name_separator, ...).
    """
    cli = datahub_cli()
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "original.json"
    recipe = workdir / "original-recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "source": {"type": "mlflow", "config": {"tracking_uri": tracking_uri, **(extra_config or {})}},
        "sink": {"type": "file", "config": {"filename": str(out)}},
    }))
    # The connector's environment must not leak into the original (MLflow or Kafka settings).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATAHUB_", "VIRTUAL_ENV"))}
    env["DATAHUB_TELEMETRY_ENABLED"] = "false"
    env["PATH"] = f"{cli.parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [str(cli), "ingest", "-c", str(recipe), "--strict-warnings"], capture_output=True, text=True,
        timeout=timeout, cwd=workdir, env=env,
    )
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"`datahub ingest` of the original MLflow source exited {result.returncode}\n"
            f"--- stdout (tail) ---\n{result.stdout[-4000:]}\n--- stderr (tail) ---\n{result.stderr[-4000:]}"
        )
    records = json.loads(out.read_text())
    if not isinstance(records, list):
        raise RuntimeError(f"{out}: expected a JSON list of MCPs, got {type(records).__name__}")
    return records
