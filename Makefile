# Two commands do all the set-up on a fresh machine:
#   make quickstart   - create .venv, install, run the whole lifecycle on the built-in corpus
#   make test         - the same install, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmstack-installed
PYTEST_ARGS ?=

.PHONY: install quickstart test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk, so no CUDA build is pulled in.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/llmstack quickstart

test: install
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
