"""What operators see of a running connector: Prometheus metrics, health endpoints, progress, status."""
