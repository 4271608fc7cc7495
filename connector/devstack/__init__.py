"""The local development stack: Kafka, schema registry and MLflow on loopback, and the demo."""
