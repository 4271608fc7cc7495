"""mlflow-datahub: keeps DataHub's catalog in step with MLflow through Kafka."""

__version__ = "0.1.0"
