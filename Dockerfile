# The connector as a container: `docker build -t mlflow-datahub .`, then
#   docker run --rm -v $PWD/my-recipe.yml:/config/recipe.yml:ro mlflow-datahub run -c /config/recipe.yml
# docker-compose.yml builds and runs it next to Kafka, a schema registry and MLflow.
#
# Only the project's base dependencies are installed: the MLflow client (mlflow-skinny), not the
# MLflow server, and none of the test tools.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY connector /src/connector
COPY schemas /src/schemas

# The change-event Avro schemas (schemas/*.avsc) ship inside the package as `connector/schemas`;
# the build fails if the installed connector cannot load them.
WORKDIR /
RUN pip install /src \
    && python -c 'from connector.contract.codec import schema_versions; print("change-event schema versions:", sorted(schema_versions()))' \
    && mlflow-datahub --version \
    && rm -rf /src

RUN useradd --system --create-home --home-dir /home/connector --uid 10001 --user-group connector
USER connector
WORKDIR /home/connector

ENTRYPOINT ["mlflow-datahub"]
CMD ["--help"]
