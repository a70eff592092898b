# Quick start: `make demo`, `make test`. Both install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint format clean-artifacts

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) dev,eval
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layermoe demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-artifacts:
	rm -rf artifacts runs
