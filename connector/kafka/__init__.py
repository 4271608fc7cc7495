"""The Kafka edge: the only place that builds Kafka and schema-registry clients, and what is done with them."""
