"""Reading MLflow: the REST reader, complete listings, incremental detection, webhooks, entity states."""
