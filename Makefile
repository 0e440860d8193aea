# The README's two commands are `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hyperdeq-installed
BASELINES_STAMP := $(VENV)/.hyperdeq-baselines

.PHONY: install install-baselines demo test test-fast lint bench clean-venv

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel release: any other resolution pulls GBs of CUDA wheels
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# the classical denoisers the evaluation compares against (extra `baselines`): --no-deps so that
# none of them pulls its own torch (hyde-images declares one); see docs/evaluation.md
$(BASELINES_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps "hyde-images==0.4.3" "pytorch-wavelets==1.3.0" "bm3d>=4.0" \
		"bm4d>=4.2.5" "kornia>=0.7" "kornia-rs>=0.1" "PyWavelets>=1.4" "six>=1.16" "setuptools<81"
	touch $(BASELINES_STAMP)

install: $(STAMP)

install-baselines: $(BASELINES_STAMP)

demo: install
	$(VENV)/bin/hyperdeq demo

# two test processes (pytest-xdist, whole files per process): much of the suite waits on real
# Prefect servers, Dask clusters and CLI subprocesses, so two at a time keep 2 cores busy
test: install-baselines
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: install
	$(PY) -m pytest -m "not slow and not integration"

lint: install
	$(VENV)/bin/ruff check pipeline workers flows tests benchmarks
	$(VENV)/bin/ruff format --check pipeline workers flows tests benchmarks
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/hyperdeq bench

clean-venv:
	rm -rf $(VENV)
