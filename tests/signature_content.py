"""MLflow content with model signatures and dataset inputs, written by the MLflow client of whichever
Python runs it: the connector's MLflow 3 (LoggedModels, `models:/m-...` sources) or MLflow 2.x's own
(`runs:/<run id>/model` sources), through `connector.devstack.mlflow_server.run_with`. Only MLflow and
pandas are imported here, so that an MLflow 2.x virtualenv can run it."""

from __future__ import annotations

import json
import os
import warnings

IRIS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
MODEL = "iris (signature), model"
BARE_MODEL = "iris without artifacts"


def _model_class() -> type:
    import mlflow.pyfunc

    class Constant(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            return [0] * len(model_input)

    return Constant


def populate(tracking_uri: str) -> str:
    """Two versions of MODEL (signatures with the iris columns, the second without `petal width (cm)`
    and with `colour, name`), each from a run with a pandas dataset input (context training), and one
    version of BARE_MODEL whose source has no artifacts. Returns JSON: {runs: {version: run id},
    bare_run: run id, mlflow: version}."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    warnings.filterwarnings("ignore")
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri, tracking_uri)
    mlflow.set_experiment("iris training")
    major = int(mlflow.__version__.split(".")[0])
    frames = [
        pd.DataFrame({IRIS[0]: [5.1, 4.9], IRIS[1]: [3.5, 3.0], IRIS[2]: [1.4, 1.4], IRIS[3]: [0.2, 0.2]}),
        pd.DataFrame({IRIS[0]: [5.1, 4.9], IRIS[1]: [3.5, 3.0], IRIS[2]: [1.4, 1.4], "colour, name": ["a", "b"],
                      "count": [1, 2]}),
    ]
    runs: dict[str, str] = {}
    for number, frame in enumerate(frames, start=1):
        with mlflow.start_run(run_name=f"iris {number}") as run:
            mlflow.log_input(mlflow.data.from_pandas(frame, name=f"iris frame {number}"), context="training")
            signature = infer_signature(frame, pd.Series([0] * len(frame), name="species"))
            if major >= 3:
                mlflow.pyfunc.log_model(name="model", python_model=_model_class()(), signature=signature,
                                        registered_model_name=MODEL)
            else:
                mlflow.pyfunc.log_model(artifact_path="model", python_model=_model_class()(), signature=signature)
                if number == 1:
                    client.create_registered_model(MODEL)
                client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
            runs[str(number)] = run.info.run_id
    with mlflow.start_run(run_name="nothing logged") as bare:
        mlflow.log_param("alpha", "1")
    client.create_registered_model(BARE_MODEL)
    client.create_model_version(BARE_MODEL, source=f"runs:/{bare.info.run_id}/model", run_id=bare.info.run_id)
    return json.dumps({"runs": runs, "bare_run": bare.info.run_id, "mlflow": mlflow.__version__})
