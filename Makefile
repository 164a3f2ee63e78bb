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

.PHONY: bench bench-full test test-fast install clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" timm vit-pytorch pytest ninja numpy
	touch $@

# Without build isolation: the build uses the torch above instead of downloading another one.
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

bench: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn --quick

bench-full: $(VENV)/.built
	$(PY) -m benchmarks.bench_reattn

test: $(VENV)/.built
	$(PY) -m pytest tests

# Everything but the CPU-only-torch install check.
test-fast: $(VENV)/.built
	$(PY) -m pytest tests -m "not install"

clean:
	rm -rf build *.egg-info reattn/_C*.so .venv-cpu-only
