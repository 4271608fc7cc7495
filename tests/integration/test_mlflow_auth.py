"""MLflow behind its own authentication: the real `mlflow server --app-name basic-auth`, with basic
auth (username and password) and a bearer token (the app's documented custom authorization
function, connector/devstack/mlflow_token_auth.py). The connector gives the credentials to its own
connections only: nothing is exported into the process environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.devstack.demo import populate
from connector.devstack.mlflow_server import MlflowServer
from connector.devstack.mlflow_token_auth import TOKEN_ENV
from connector.mlflow.reader import AuthenticationFailed, MlflowReader, ReaderSettings, host_credentials
from tests.conftest import REPO, ConfigFactory, run_cli

ADMIN, PASSWORD, TOKEN = "admin", "adm1n-Pa55word", "t0ken-for-the-connector"


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    ini = workdir / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{workdir / 'auth.db'}\nadmin_username = {ADMIN}\n"
                   "authorization_function = connector.devstack.mlflow_token_auth:authenticate\n")
    server = MlflowServer(workdir, app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", TOKEN_ENV: TOKEN,
        "PYTHONPATH": str(REPO)}).start()
    try:
        with pytest.MonkeyPatch.context() as env:  # the demo content is written by an authenticated client
            env.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
            env.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
            populate(server.uri)
        yield server
    finally:
        server.stop()


def _snapshot(make_config: ConfigFactory, uri: str, credentials: dict[str, str]) -> tuple[int, str]:
    path, _ = make_config(uri, {"source": {"config": credentials}})
    result = run_cli("snapshot", "-c", str(path), "--mlflow-retry-seconds", "5")
    return result.returncode, result.stdout + result.stderr


def test_without_credentials_the_app_refuses(auth_mlflow: MlflowServer) -> None:
    with pytest.raises(AuthenticationFailed, match="refused the credentials .*HTTP 401.*gives no credentials"):
        MlflowReader(ReaderSettings(auth_mlflow.uri, auth_mlflow.uri)).check()


@pytest.mark.parametrize("credentials", [{"username": ADMIN, "password": PASSWORD}, {"token": TOKEN}],
                         ids=["basic", "bearer"])
def test_snapshot_with_credentials(auth_mlflow: MlflowServer, make_config: ConfigFactory,
                                   credentials: dict[str, str]) -> None:
    code, output = _snapshot(make_config, auth_mlflow.uri, credentials)
    assert code == 0, output
    assert "complete" in output and "registered_model" in output
    assert PASSWORD not in output and TOKEN not in output


@pytest.mark.parametrize("credentials", [{"username": ADMIN, "password": "wrong-Pa55word"},
                                         {"token": "wrong-t0ken"}], ids=["basic", "bearer"])
def test_wrong_credentials_are_one_clear_line(auth_mlflow: MlflowServer, make_config: ConfigFactory,
                                              credentials: dict[str, str]) -> None:
    code, output = _snapshot(make_config, auth_mlflow.uri, credentials)
    last = output.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in output, output
    assert "refused the credentials" in last and "HTTP 401" in last, last
    assert "wrong-Pa55word" not in output and "wrong-t0ken" not in output


def test_credentials_stay_with_their_connection(auth_mlflow: MlflowServer) -> None:
    settings = ReaderSettings(auth_mlflow.uri, auth_mlflow.uri, username=ADMIN, password=PASSWORD)
    reader = MlflowReader(settings)
    assert [m.name for page in reader.registered_models() for m in page]
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} & set(os.environ)
    # A registry on another host never receives the tracking server's credentials.
    elsewhere = host_credentials("https://registry.example.com", settings)
    assert elsewhere.username is None and elsewhere.password is None
    assert host_credentials(auth_mlflow.uri + "/", settings).password == PASSWORD


def test_the_connector_never_exports_credentials(tmp_path: Path) -> None:
    """`run` and `snapshot` load the configuration in this process's own code: no environment write."""
    from connector.config import parse
    from connector.mlflow.reader import reader_settings

    cfg = parse({"source": {"type": "mlflow", "config": {"tracking_uri": "http://127.0.0.1:1", "username": "u",
                                                          "password": "p-secret-1", "token": "t-secret-1"}}})
    before = dict(os.environ)
    settings = reader_settings(cfg)
    MlflowReader(settings)
    assert {k: v for k, v in os.environ.items() if "secret-1" in v} == {}
    assert set(os.environ) - set(before) <= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                                              "MLFLOW_HTTP_REQUEST_TIMEOUT"}
    assert "p-secret-1" not in repr(settings) and "t-secret-1" not in repr(settings)
