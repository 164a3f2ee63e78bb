# reattn: two commands on a fresh machine.
#   make bench   the microbenchmark against the eager baseline on the device present (quick suite)
#   make test    the whole test suite
# Both create (and then reuse) a virtual environment in .venv with the GPU user's stack:
# torch==2.15.0 (CUDA build; it also runs on CPU) with the triton it pins, timm, vit-pytorch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.15.0
export MAX_JOBS ?= 2
# cpp_extension otherwise looks for the toolkit in /usr/local and fails to find cudart.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: bench bench-full bench-report test test-fast install clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" timm vit-pytorch pytest ninja numpy matplotlib tqdm scikit-learn
	touch $@

# Without build isolation: the build uses the torch above instead of downloading another one.
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# Table on the terminal; rows appended to benchmarks/results/{microbench,models}.csv; PNGs next to them.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS='--machine "2-core dev machine"'.
bench: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn --quick $(BENCH_ARGS)

bench-full: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn $(BENCH_ARGS)

# Rewrite the README's results section from the CSVs.
bench-report: $(VENV)/.deps
	$(PY) -m benchmarks.report

test: $(VENV)/.built
	$(PY) -m pytest tests

# Everything but the tests that install packages (the CPU-only-torch build, older timm releases).
test-fast: $(VENV)/.built
	$(PY) -m pytest tests -m "not install"

clean:
	rm -rf build *.egg-info reattn/_C*.so .venv-cpu-only
