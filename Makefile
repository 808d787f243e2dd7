# Two commands (see README):
#   make demo   -- create/refresh .venv, install, run `d2l demo` on the embedded default model
#   make test   -- create/refresh .venv, install, run the test suite (what .ci/run calls)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2l-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export SCARF_NO_ANALYTICS ?= true
export ANONYMIZED_TELEMETRY ?= False
export UNSTRUCTURED_DISABLE_NOTICE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/test.txt requirements/nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/base.txt -r requirements/test.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/d2l demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check d2l_integrations tests benchmarks

clean:
	rm -rf $(VENV)
