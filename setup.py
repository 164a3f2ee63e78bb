"""Build script for reattn: the Python package plus the compiled extension ``reattn._C``.

The extension always contains the C++ CPU part (``csrc/bindings.cpp``, ``csrc/cpu/``).
When the installed torch was built with CUDA (``torch.version.cuda`` is set) the CUDA sources
in ``csrc/cuda/`` are compiled into the same extension with ``CUDAExtension``; with a CPU-only
torch the CPU part is built alone and the build says so.

Environment:
  REATTN_CUDA_ARCHS  ';'-separated compute capabilities, default "80;90". SASS is emitted for
                     each, plus PTX for the newest so later GPUs can JIT it.
  REATTN_NO_CUDA=1   build the CPU part only, even with a CUDA torch.
  CUDA_HOME          defaults to /usr/local/cuda when nvcc is there.
  MAX_JOBS           parallel compile jobs (honoured by torch's ninja build).

The package's metadata (name, version, dependencies, extras) is in pyproject.toml; this file adds
what depends on the installed torch. Install without build isolation, so the build uses the torch
already installed (under isolation pip builds in a separate environment, without it):
  pip install --no-build-isolation -e .     (editable)   or   pip install --no-build-isolation .
"""
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - a build without torch cannot compile anything
    sys.exit(
        "reattn: torch cannot be imported by this build. reattn._C is compiled against the torch it will "
        "run with: install torch first (pip install torch ninja), then build without isolation, where pip "
        "would hide it: pip install --no-build-isolation -e .  (or . for a regular install)"
    )

DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _log(message: str) -> None:
    print(f"reattn setup: {message}", file=sys.stderr, flush=True)


def _cuda_archs() -> list[str]:
    raw = os.environ.get("REATTN_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for arch in archs:
        if not arch.isdigit():
            sys.exit(f"reattn: REATTN_CUDA_ARCHS entry {arch!r} is not a compute capability like 80 or 90")
    if not archs:
        sys.exit("reattn: REATTN_CUDA_ARCHS is empty; give e.g. '80;90'")
    return sorted(set(archs), key=int)


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _want_cuda() -> bool:
    if os.environ.get("REATTN_NO_CUDA", "0") == "1":
        _log("REATTN_NO_CUDA=1: building the CPU part of reattn._C only")
        return False
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: building the CPU part of reattn._C only")
        return False
    if os.environ.get("CUDA_HOME") is None and os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
        # cpp_extension reads CUDA_HOME at import time; point it at the toolkit we found.
        cpp_extension.CUDA_HOME = DEFAULT_CUDA_HOME
    if cpp_extension.CUDA_HOME is None:
        sys.exit(
            f"reattn: torch {torch.__version__} was built with CUDA {torch.version.cuda} but no CUDA "
            "toolkit was found: set CUDA_HOME to a toolkit with nvcc, or REATTN_NO_CUDA=1 for a CPU-only build"
        )
    return True


def _extensions():
    # No -std flag: torch's build helpers add the standard its headers need (C++20 for torch 2.15).
    # -g0: Python's CFLAGS add -g, whose debug info for torch's headers made the objects 14-36x larger
    # and their compiles ~30% slower (bindings.cpp 56 -> 39 s, re_attention.cpp 9.2 -> 5.4 s).
    cxx_flags = ["-O3", "-fopenmp", "-g0"]
    # at::parallel_for is inlined into our code: without -fopenmp at link time too it runs on one thread.
    link_flags = ["-fopenmp"]
    # The CUDA ops' torch glue and their host emulator are built with every torch (the CPU test
    # suite runs the CUDA programs through the emulator); the kernels need a CUDA torch.
    sources = ["csrc/bindings.cpp", "csrc/cpu/row_stats.cpp", "csrc/cpu/re_attention.cpp", "csrc/cpu/vec_ops.cpp",
               "csrc/cuda/ops.cpp", "csrc/cuda/emulate.cpp", "csrc/cuda/sim.cpp"]
    macros = [("REATTN_TORCH_VERSION", torch.__version__.split("+")[0])]
    if _want_cuda():
        archs = _cuda_archs()
        _log(f"torch {torch.__version__} has CUDA {torch.version.cuda}: building CPU and CUDA parts "
             f"for sm_{', sm_'.join(archs)} (+PTX for sm_{archs[-1]}) with {cpp_extension.CUDA_HOME}")
        # One translation unit per storage type: MAX_JOBS compiles them in parallel.
        sources += ["csrc/cuda/row_stats.cu", "csrc/cuda/device_checks.cu", "csrc/cuda/head_affine.cu", "csrc/cuda/parameters.cu", "csrc/cuda/forward_bf16.cu",
                    "csrc/cuda/forward_f16.cu", "csrc/cuda/backward_bf16.cu", "csrc/cuda/backward_f16.cu"] + [f"csrc/cuda/re_attention_{t}.cu" for t in ("f16", "bf16", "f32", "f64")]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", *_gencode_flags(archs)]
        # Only the host side reports the archs; nvcc would split a comma-separated -D value.
        cxx_flags = cxx_flags + [f"-DREATTN_CUDA_ARCHS={','.join(archs)}"]
        return [
            cpp_extension.CUDAExtension(
                name="reattn._C",
                sources=sources,
                define_macros=macros + [("REATTN_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [
        cpp_extension.CppExtension(
            name="reattn._C",
            sources=sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


# Every package under reattn/ (a hand-kept list once left reattn.models out of wheels), plus the Triton
# kernels, which live in kernels/ and install as reattn.kernels. Where a development setup links
# reattn/kernels -> ../kernels, find_packages finds reattn.kernels through the link too: hence the set.
PACKAGES = sorted(set(find_packages(include=["reattn", "reattn.*"])) | {"reattn.kernels"})

setup(
    packages=PACKAGES,
    package_dir={"reattn": "reattn", "reattn.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
