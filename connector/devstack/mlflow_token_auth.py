"""An `authorization_function` for MLflow's basic-auth app that also takes a bearer token, as MLflow's
"custom authentication" documents: `Authorization: Bearer <token>` with the token in
MLFLOW_DATAHUB_MLFLOW_TOKEN is the app's admin user; anything else goes to the app's own basic auth.
It lets the tests run the connector's token authentication against the real app."""

from __future__ import annotations

import hmac
import os

from flask import Response, request
from mlflow.server.auth import auth_config, authenticate_request_basic_auth
from werkzeug.datastructures import Authorization

TOKEN_ENV = "MLFLOW_DATAHUB_MLFLOW_TOKEN"


def authenticate() -> Authorization | Response:
    header = request.headers.get("Authorization", "")
    token = os.environ.get(TOKEN_ENV, "")
    if token and header.startswith("Bearer "):
        if hmac.compare_digest(header[len("Bearer "):].encode(), token.encode()):
            return Authorization(auth_type="bearer", data={"username": auth_config.admin_username})
        return Response("invalid token", 401)
    return authenticate_request_basic_auth()
