# reattn: a virtual environment, the build and the tests in a few commands (the README's quick start
# says what each installs and how long it takes).
#   make install        .venv with the GPU user's stack: torch==2.15.0 (the CUDA build: it also runs on
#                       CPU; with its CUDA libraries and triton, about 5.8 GB installed); then
#                       pip install --no-build-isolation -e ".[test,bench]": the test and benchmark
#                       packages (pyproject.toml's extras) and reattn._C (CPU part, and the CUDA kernels
#                       when nvcc is there)
#   make install TORCH=cpu   the CPU-only path: .venv-cpu with torch's CPU wheel (no CUDA libraries, no
#                       triton) and the CPU part of reattn._C only
#   make test           the whole test suite (installs first if needed), in TEST_WORKERS=2 processes
#                       (pytest-xdist); make test-fast leaves out the tests that install packages
#   make bench          the quick benchmark; results go to $(BENCH_RESULTS) (outside the checkout)
#   make bench-record   the full benchmark recorded into benchmarks/results and the README

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
TORCH ?= cuda
ifeq ($(TORCH),cpu)
VENV ?= .venv-cpu
# torch's CPU wheels live on its own package index (CPU_TORCH_INDEX= installs from the configured ones)
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch torchvision
TORCH_INSTALL = $(TORCH_SPEC) $(if $(CPU_TORCH_INDEX),--index-url $(CPU_TORCH_INDEX))
else ifeq ($(TORCH),cuda)
VENV ?= .venv
TORCH_SPEC ?= torch==2.15.0
TORCH_INSTALL = $(TORCH_SPEC)
else
$(error TORCH must be cuda or cpu, got $(TORCH))
endif
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
# cpp_extension otherwise looks for the toolkit in /usr/local and fails to find cudart.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# Benchmark results of `make bench` / `make bench-full`: outside the checkout, which stays clean.
BENCH_RESULTS ?= $(VENV)/bench-results

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
COMMA := ,
STEP = @echo; echo "== reattn: $(1) ($$(date +%H:%M:%S))"

.PHONY: bench bench-full bench-record bench-report test test-fast install clean

# The build requirements (setuptools, ninja) are installed here by hand: the build below runs without
# isolation, so that reattn._C is compiled against the torch installed here.
$(VENV)/.deps:
	$(call STEP,1/3 virtual environment $(VENV) with the build tools (pip setuptools ninja))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip setuptools ninja
	$(call STEP,2/3 torch ($(TORCH_INSTALL)): the largest download; pip shows its progress)
	$(PY) -m pip install --progress-bar on $(TORCH_INSTALL)
	touch $@

$(VENV)/constraints.txt: $(VENV)/.deps
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $@

# Without build isolation: the build uses the torch above instead of downloading another one. The extras
# (pyproject.toml) bring the test and benchmark packages; once there, a rebuild only checks them. The
# constraint keeps the torch above: timm needs torchvision, and the newest torchvision pins the newest
# torch, which pip would otherwise install over a CPU or older torch, after building reattn._C against it.
$(VENV)/.built: $(VENV)/.deps $(VENV)/constraints.txt pyproject.toml setup.py $(CSRC)
	$(call STEP,3/3 pip install --no-build-isolation -e .[test$(COMMA)bench]: the test and benchmark packages$(COMMA) then reattn._C with MAX_JOBS=$(MAX_JOBS) (compiler lines follow; the CUDA kernels take minutes))
	$(PY) -m pip install -v --no-build-isolation -c $(VENV)/constraints.txt -e ".[test,bench]" 2>&1 | tee $(VENV)/build.log \
	  | { grep --line-buffered -E '^(Collecting|Successfully installed) |^ *reattn setup|^ *\[[0-9]+/[0-9]+\] |rror' \
	      | sed -u -E 's/^ *(\[[0-9]+\/[0-9]+\]) .* -c (\S+\.(cpp|cu)) .*/\1 compiling \2/; s/^ +(reattn setup)/\1/'; true; } \
	  || { echo "the build failed; its whole output is in $(VENV)/build.log"; exit 1; }
	$(PY) -c "import reattn; print('reattn._C:', reattn.extension_info())"
	touch $@
	$(call STEP,installed)

install: $(VENV)/.built

# Table on the terminal; rows appended to $(BENCH_RESULTS)/{microbench,models}.csv, PNGs next to them.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS='--machine "2-core dev machine"'.
bench: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn --quick --results $(BENCH_RESULTS) $(BENCH_ARGS)

bench-full: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn --results $(BENCH_RESULTS) $(BENCH_ARGS)

# Deliberately into the repository: the full suite's rows appended to benchmarks/results/*.csv, its
# plots there, and the README's results section rewritten from them.
bench-record: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn --results benchmarks/results $(BENCH_ARGS)
	$(PY) -m benchmarks.report

# Rewrite the README's results section from the CSVs in benchmarks/results.
bench-report: $(VENV)/.built
	$(PY) -m benchmarks.report

# pytest-xdist workers (TEST_WORKERS=1: one process): the 2-core CI machine is the reference.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest tests $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) --durations=25

test: $(VENV)/.built
	$(PYTEST)

# Everything but the tests that install packages (the CPU-only-torch build, older timm releases).
test-fast: $(VENV)/.built
	$(PYTEST) -m "not install"

clean:
	rm -rf build *.egg-info reattn/_C*.so
