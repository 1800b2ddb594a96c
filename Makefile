VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tandem-installed

.PHONY: setup serve test lint bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

# Sets everything up, prepares the default model and builds the CPU kernels once, runs the server on 127.0.0.1:8000.
serve: setup
	$(VENV)/bin/tandem model prepare
	$(VENV)/bin/tandem kernels build
	$(VENV)/bin/tandem serve $(ARGS)

# Sets everything up and runs the whole suite.
test: setup
	$(VENV)/bin/tandem model prepare
	$(VENV)/bin/tandem kernels build
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check tandem tests
	$(VENV)/bin/ruff format --check tandem tests

bench: setup
	$(VENV)/bin/tandem bench offline $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
