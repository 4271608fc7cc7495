"""The command's start-up imports only what it needs before its first MLflow request."""

from __future__ import annotations

import subprocess
import sys

from connector.config import ALL_ENV_TYPES


def test_environments_are_datahubs() -> None:
    from datahub.configuration.source_common import ALL_ENV_TYPES as DATAHUB_ENV_TYPES

    assert set(DATAHUB_ENV_TYPES) == set(ALL_ENV_TYPES)


def test_the_command_and_its_configuration_import_neither_datahub_nor_mlflow() -> None:
    code = ("import sys, connector.cli, connector.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'datahub', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
