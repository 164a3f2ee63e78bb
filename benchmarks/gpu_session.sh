#!/usr/bin/env bash
# The GPU-only work in as few calls as possible, for a machine lent for a short while (the device
# tool's H100/H200: torch 2.11, triton 3.6, no package index, 10 minutes a command, 15 minutes of
# device time in all, machine start included; the machine goes back 30 s after a call). Every step
# has its own time limit (seconds, from the environment: BUILD_S, SMOKE_S, TIME_S, BENCH_S; defaults
# 170, 100, 170, 150); the test step gets what is left of DEADLINE_S (default 570) seconds since the
# script started, so one device call runs `env build smoke time test` inside its 600 s. Everything it
# writes goes under $OUT (default /tmp/reattn-gpu), flat, so it can come back (8 files at most):
#   env.txt         GPU, driver, nvcc, python / torch / triton versions
#   build.log       the editable install: reattn._C built for this GPU's compute capability only
#   smoke.log       `python -m benchmarks.gpu_smoke`: every norm mode, forward and backward, of the cuda
#                   and triton backends (one process each, in parallel) against float64; a CUDA fault
#                   in the cuda backend is followed by compute-sanitizer on the smallest shapes
#   diag.txt        `diag`: the toolchain and a C++ exception thrown by reattn._C (segfaulted on the H200)
#   tests.log       tests/backends, tests/kernels and the GPU-only tests with compiled Triton and CUDA
#                   kernels (no interpreter, no emulator), -v so a cut-off run still counts
#   microbench.csv  rows of `python -m benchmarks.bench_reattn --quick` (bf16 DeiT-S B=256 and
#   models.csv      DeepViT-16b B=128, fwd and fwd+bwd, every norm, vs eager / torch.compile / SDPA;
#                   N sweep; whole models); append them to benchmarks/results/*.csv here, then
#                   `python -m benchmarks.plots` and `python -m benchmarks.report`
#   bench.log       the benchmark's table
#   measured.csv    `python -m benchmarks.gpu_timing`: every call and kernel the static model covers
#                   (named shapes, bf16, each norm, fwd/bwd/fwd+bwd; triton, cuda, the reference
#                   FlashAttention-2, eager) timed with CUDA events, measured_us beside the model's
#                   t_low_us/t_high_us for this GPU (benchmarks/results/static_model.csv): calibration.
#                   The model reads triton 3.9's compiles; the GPU runs 3.6's, whose registers and spills
#                   differ at some launches (tests/kernels/test_triton_release.py compiles them; ViT-B's
#                   split backward spilled 80/208 B under 3.9, 296/272 B under 3.6, 2026-12-08)
#   timing.log      its log
#
# Usage: bash benchmarks/gpu_session.sh STEP...   with STEP in env, build, smoke, diag, time, test, bench, all
#   (default all = env build smoke diag time test). A failed build does not stop the steps after it: the
#   triton backend runs without reattn._C, and the cuda rows then say why they cannot run.
# vit-pytorch is not on those machines: put its wheel in .whl/ (ignored by git, carried with the
# device tool's `carry`); any wheel there is installed into /tmp/site first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl vit-pytorch
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/reattn-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_session.sh: $PY sees no CUDA GPU; this script is for a GPU machine (make test / make bench elsewhere)" >&2
  exit 2
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session.sh: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# This GPU's compute capability as REATTN_CUDA_ARCHS spells it (90 for sm_90).
gpu_cap() { $PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())"; }

step_env() {
  {
    nvidia-smi
    nvcc --version
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|timm|vit-pytorch|numpy|scikit-learn) "
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

step_build() {
  # One arch: the build takes a fraction of the two-arch default; -e maps reattn.kernels to kernels/.
  local cap
  cap=$(gpu_cap)
  echo "building reattn._C for sm_$cap with $(nproc) jobs"
  local start=$SECONDS
  if ! REATTN_CUDA_ARCHS=$cap MAX_JOBS=$(nproc) timeout "${BUILD_S:-170}" \
      $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "gpu_session.sh: build failed (whole log in build.log)" >&2
    return 1
  fi
  echo "built in $((SECONDS - start)) s"
  $PY -c "import reattn, reattn._C as c; print(reattn.__file__, c.__file__, c.build_info())"
}

ensure_built() {
  $PY -c "import reattn._C, reattn.kernels" 2>/dev/null || step_build
}

step_smoke() {
  # Both backends at once (Triton's compiles are CPU work, the cuda kernels are prebuilt).
  ( timeout "${SMOKE_S:-100}" $PY -m benchmarks.gpu_smoke --backend cuda > "$OUT/smoke_cuda.txt" 2>&1;
    echo "exit $?" >> "$OUT/smoke_cuda.txt" ) &
  timeout "${SMOKE_S:-100}" $PY -m benchmarks.gpu_smoke --backend triton --dtypes bf16 fp32 --shapes model \
    > "$OUT/smoke_triton.txt" 2>&1
  echo "exit $?" >> "$OUT/smoke_triton.txt"
  wait
  cat "$OUT/smoke_cuda.txt" "$OUT/smoke_triton.txt" > "$OUT/smoke.log"
  rm -f "$OUT/smoke_cuda.txt" "$OUT/smoke_triton.txt"
  if grep -q "CUDA error: the context is gone" "$OUT/smoke.log" && command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer (memcheck) on the cuda backend, bf16" >> "$OUT/smoke.log"
    timeout 90 compute-sanitizer --tool memcheck --print-limit 20 $PY -m benchmarks.gpu_smoke --backend cuda \
      --dtypes bf16 --shapes model >> "$OUT/smoke.log" 2>&1
  fi
  grep -v "^ *$" "$OUT/smoke.log" | tail -60
}

step_diag() {
  # On the H200 (2026-12-04) every C++ exception reattn._C threw (a TORCH_CHECK on bad input, the CPU
  # kernel's too) killed the process with a segmentation fault: the toolchain and the unwinder, and where
  # the fault is (cuda-gdb debugs host-only programs there; there is no gdb).
  ensure_built
  local probe="import torch, reattn._C as c
try:
    c.row_logsumexp(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), 1.0)
except RuntimeError as e:
    print('C++ exception reached Python:', str(e).splitlines()[0])"
  {
    echo "== toolchain"; c++ --version | head -1; nvcc --version | tail -1
    $PY -c "import torch; print('torch cxx11 abi', torch.compiled_with_cxx11_abi()); print(torch.__config__.show())" \
      | grep -iE "abi|compiler|CXX_FLAGS" | head -8
    echo "== libraries of reattn._C"; ldd "$($PY -c 'import reattn._C as c; print(c.__file__)')" | grep -iE "stdc|gcc_s|gomp|torch|python"
    echo "== a C++ exception from reattn._C"; timeout 60 $PY -c "$probe"; echo "exit $?"
    echo "== the same under cuda-gdb"
    timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY -c "$probe" 2>&1 | tail -60
  } > "$OUT/diag.txt" 2>&1
  grep -v "^ *$" "$OUT/diag.txt" | head -40
}

step_test() {
  ensure_built
  # -m "not install": the CPU-only install test needs the dev machine's local torch wheel. SIGINT at the
  # limit: pytest then still prints its summary; -v lines count what ran before it.
  local left=$(( ${DEADLINE_S:-570} - SECONDS )) cap
  # The archs the tests expect of the build (tests/_build.py) are the ones step_build compiled.
  cap=$(gpu_cap)
  export REATTN_CUDA_ARCHS=${REATTN_CUDA_ARCHS:-$cap}
  [ "$left" -lt 30 ] && { echo "gpu_session.sh: no time left for the tests ($left s)"; return 0; }
  timeout -s INT -k 20 "$left" $PY -m pytest -v -n 12 -m "not install" -p no:cacheprovider -rfE \
    tests/backends/test_cuda_backend.py tests/backends/test_fused_backends.py tests/test_extension.py \
    tests/backends tests/kernels --ignore=tests/kernels/test_aot.py > "$OUT/tests.log" 2>&1
  grep -c " PASSED" "$OUT/tests.log" | sed 's/^/passed lines: /'
  grep -E " (FAILED|ERROR) " "$OUT/tests.log" | head -30
  tail -25 "$OUT/tests.log"
}

step_bench() {
  ensure_built || return 1
  # BENCH_ARGS: more options, e.g. "--compile none" when the inductor compiles would not fit the limit.
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-150}" $PY -m benchmarks.bench_reattn --quick --results "$OUT" --no-plots ${BENCH_ARGS:-} \
    --machine "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) (device tool)" \
    2>&1 | tee "$OUT/bench.log" | grep -v "config/s" | tail -80
}

step_time() {
  ensure_built
  # The budget stops starting new cases a little before the hard limit; rows are written as measured.
  local limit=${TIME_S:-170} backends=""
  # A cuda backend that faulted in the smoke step would take the timing process's context with it.
  if [ -f "$OUT/smoke.log" ] && grep -q "CUDA error: the context is gone" "$OUT/smoke.log"; then
    backends="--backends triton reference sdpa eager"
    echo "gpu_session.sh: the cuda backend faulted in the smoke step: timing without it"
  fi
  # shellcheck disable=SC2086
  timeout "$limit" $PY -m benchmarks.gpu_timing --out "$OUT/measured.csv" --budget $((limit - 30)) $backends ${TIME_ARGS:-} \
    2>&1 | tee "$OUT/timing.log" | tail -40
}

for step in "${steps[@]}"; do
  case "$step" in
    env) step_env ;;
    build) step_build ;;
    smoke) step_smoke ;;
    diag) step_diag ;;
    test) step_test ;;
    bench) step_bench ;;
    time) step_time ;;
    all) step_env; step_build; step_smoke; step_diag; step_time; step_test ;;
    *) echo "gpu_session.sh: unknown step '$step' (env, build, smoke, diag, time, test, bench, all)" >&2; exit 2 ;;
  esac
done
