# Two commands on a fresh machine:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV := .venv
ORIGINAL := .cache/original-venv
MLFLOW2 := .cache/mlflow2-venv

.PHONY: demo test test-unit lint bench soak clean stack-down

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# DataHub's batch MLflow source, for the parity test and the benchmark: its own environment,
# because it pins mlflow-skinny<2.21 (and MLflow 2.20 needs SQLAlchemy<2.1).
$(ORIGINAL)/.installed:
	$(PYTHON) -m venv $(ORIGINAL)
	$(ORIGINAL)/bin/pip install -q --upgrade pip
	$(ORIGINAL)/bin/pip install -q 'acryl-datahub[mlflow]==1.7.0.17' 'sqlalchemy<2.1'
	touch $@

# An MLflow 2.x server for the compatibility tests, in its own environment (2.x starts with gunicorn).
$(MLFLOW2)/.installed:
	$(PYTHON) -m venv $(MLFLOW2)
	$(MLFLOW2)/bin/pip install -q --upgrade pip
	$(MLFLOW2)/bin/pip install -q 'mlflow==2.20.3' 'sqlalchemy<2.1'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mlflow-datahub demo -c examples/local.yml

# The whole suite: pure unit tests, then the integration tests on the real local stack.
test: $(VENV)/.installed $(ORIGINAL)/.installed $(MLFLOW2)/.installed
	$(VENV)/bin/ruff check connector tests bench
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not soak" tests/unit tests/integration

# The pure tests only (seconds, no stack): the inner loop.
test-unit: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check connector tests bench

# Memory under churn: 50 rounds of creating and deleting runs and models under `run` (RSS within 10%).
soak: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -s -p no:cacheprovider -m soak tests/integration/test_soak.py

bench: $(VENV)/.installed $(ORIGINAL)/.installed
	$(VENV)/bin/python bench/benchmark.py

stack-down: $(VENV)/.installed
	$(VENV)/bin/mlflow-datahub stack down

clean:
	rm -rf $(VENV) .cache build *.egg-info
