# dlearn: `make book` runs the book, `make test` runs every test. Both build .venv first if needed.
#
# Threads: the recipes below run torch with one thread per process (OMP_NUM_THREADS=1), because on
# a small busy machine two spinning OpenMP threads are 10-100x slower than one. Override with
# `make test THREADS=4`. Inside your own Python session dlearn never changes the thread count.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
THREADS ?= 1
# pytest workers for the tests and the notebooks (each with THREADS torch threads; a notebook stays whole on one)
JOBS ?= 2
# torch: on a machine without an NVIDIA GPU the set-up installs the CPU build named here; add
# TORCH_CPU_INDEX="--index-url https://download.pytorch.org/whl/cpu" where PyPI's default wheel is a CUDA one.
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?=
TORCH_GPU ?= torch>=2.4
# the lock: the exact version of every package the set-up installs, applied as pip constraints (so torch's CPU build,
# 2.13.0+cpu, still fits torch==2.13.0); `make lock` regenerates it from pyproject.toml, `make env LOCK=` ignores it
LOCK ?= .ci/constraints.txt
LOCK_FLAGS = $(if $(LOCK),-c $(LOCK))
# `make test-latest` builds this environment from the newest releases that pyproject.toml allows, without the lock
LATEST_VENV ?= .venv-latest
NB ?=
RUN := env OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE

.PHONY: env book site test unit registry notebooks smoke lab lint clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already installed in $(VENV)"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing $(TORCH_GPU)"; $(PY) -m pip install $(LOCK_FLAGS) "$(TORCH_GPU)"; \
	else \
	  echo "no GPU: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; \
	fi
	@$(PY) -m pip uninstall -y -q dlearn 2>/dev/null || true  # the old distribution name (another project's on PyPI)
	$(PY) -m pip install $(LOCK_FLAGS) -e ".[dev]"
	@touch $@

book: env
	$(RUN) $(PY) -m dlearn.book $(NB)
	$(RUN) $(PY) -m dlearn.site

# the book as an offline website in build/site/ (from the executed notebooks, nothing re-runs); the unit tests'
# tests/test_site.py builds it when missing or stale and checks it in headless Chromium
site: env
	$(RUN) $(PY) -m dlearn.site

# unit tests: every module against its oracles on small inputs, live checks of the shipped models, the recorded numbers
unit: env
	$(RUN) $(PY) -m pytest -n $(JOBS) -m "not registry" tests

# the weights registry: every recipe runs a few steps, every shipped file re-reaches its recorded metrics
registry: env
	$(RUN) $(PY) -m pytest -n $(JOBS) -m registry tests

# every notebook runs and its checked outputs match; JOBS notebooks at once, each whole on one worker
notebooks: env
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(RUN) DLEARN_OUTPUT_DIR=build/test-output DLEARN_PROGRESS=0 $(PY) -m pytest --nbval-lax \
	    -n $(JOBS) --dist loadfile --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout=600 notebooks; \
	else echo "no notebooks yet: nothing for nbval to check"; fi

test: unit registry notebooks

.PHONY: test-latest lock

# every test on the newest releases that pyproject.toml allows, in a fresh LATEST_VENV without the lock: drift in
# diffusers, transformers or torch shows here before it reaches a reader. Needs the network; takes the time of
# a set-up plus `make test`.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) env VENV=$(LATEST_VENV) LOCK= TORCH_CPU=torch
	@$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|numpy|diffusers|transformers|accelerate) "
	$(MAKE) test VENV=$(LATEST_VENV) LOCK=

# regenerate the lock from pyproject.toml with uv, for every platform and Python version the project supports, torch
# pinned to TORCH_CPU; pins that still fit are kept, `make lock UPGRADE=1` moves all to the newest. Needs the network.
PYTHON_MIN := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"/\1/p' pyproject.toml)
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv>=0.5"
	@mkdir -p build && echo "$(TORCH_CPU)" > build/lock-torch.txt
	$(PY) -m uv pip compile -q pyproject.toml --extra dev --universal --python-version $(PYTHON_MIN) -c build/lock-torch.txt \
	  $(if $(UPGRADE),--upgrade) -o $(LOCK) --custom-compile-command "make lock"
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) pins"

# chapter 11's path on one pipeline folder (default: the book's trained tiny Stable Diffusion): report.json + grid.png in
# build/smoke; with your weights and a GPU: `make smoke SD_PATH=my-sd SMOKE_ARGS="--dtype float16"`
SD_PATH ?= dlearn/weights/tiny_sd
SMOKE_ARGS ?=
smoke: env
	$(RUN) $(PY) -m dlearn.smoke --path $(SD_PATH) --out build/smoke $(SMOKE_ARGS)

lab: env
	$(VENV)/bin/jupyter lab notebooks

lint: env
	$(VENV)/bin/ruff check dlearn tests

clean:
	rm -rf build .pytest_cache
