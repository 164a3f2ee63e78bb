"""The installs tests/test_install.py checks, run as one background process (``python -m tests._install_run``).

tests/conftest.py starts it at collection when the install tests are selected: the builds then use the
core the rest of the suite leaves idle (most tests are single-threaded), and test_install.py reads the
outcome. Each step prints one line ``INSTALL {json}``: the step's name, command, return code, the tails
of its output and its seconds; the tests assert on those lines, so a failed step fails its test with
the pip/compiler output.

Steps, in a temporary folder removed at the end (``REATTN_KEEP_INSTALL_DIR=1`` keeps it):

1. ``venv``: a fresh virtual environment from the standard library's ``venv`` with pip 23.2.1 (Python
   3.11's own; pinned to it where the interpreter ships another), the current setuptools, ``wheel``
   (with both present, pip 23.2.1 took a project without ``pyproject.toml`` down the legacy
   ``setup.py develop`` path, which setuptools >= 80 re-runs as a pip install *with* build isolation,
   where torch is missing) and ninja, and the oldest torch ``pyproject.toml`` claims, from its CPU-only
   wheel (``REATTN_CPU_TORCH_SPEC`` overrides the requirement, e.g. to point at a wheel file).
2. ``sdist: build_sdist``: a source distribution built from a fresh copy of the sources (the checkout and
   its in-tree ``reattn/_C*.so`` are left alone).
3. ``editable``: ``pip install --no-build-isolation -e .`` from another fresh copy in ``src/``, what ``import
   reattn, reattn.kernels, reattn._C`` finds, and whether a module added to ``kernels/`` afterwards imports
   without reinstalling.
4. ``sdist``: ``src/`` replaced by the unpacked source distribution and the wheel ``pip wheel
   --no-build-isolation`` builds from it (what ``pip install reattn-*.tar.gz`` does: it checks that the sdist
   holds everything the build needs), that wheel installed (replacing the editable install), the same
   imports from site-packages, the files installed as ``reattn.kernels``, and a smoke run of the CPU part.

Both builds compile through ``tests/_compile_cache.py`` (``CXX``): in the same folder, the second build's
compiles preprocess the sdist's sources and, where those match the first build's, take its objects instead
of compiling torch's headers again (step ``sdist: compile cache`` lists the hits and misses). That wrapper
also ends each compile's options with ``OPTIMIZE`` (``-O1``, over setup.py's ``-O3``): see there.

``MAX_JOBS`` (each build's parallelism) comes from the environment: conftest passes 1 while other
tests run beside the builds, 2 when only the install tests were selected.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIP_VERSION = "23.2.1"  # Python 3.11's own pip, the oldest the install is tested with

# The builds here check the packaging (pip 23.2.1, setuptools, the oldest torch's headers, what the sdist
# holds), not the optimizer: ``make install`` compiles the same sources at setup.py's -O3. -O1 still
# optimizes (``__OPTIMIZE__`` and the inlining the headers expect) at half the CPU: the CPU part's seven
# compiles took 109 CPU-s at -O3 and 57 at -O1 on the 2-core dev machine (csrc/cuda/emulate.cpp 58 -> 22 s),
# and these builds are the longest chain of work beside the rest of the suite.
OPTIMIZE = ("-O1",)

# What a copy of the sources leaves out: the environments, build outputs, and the development
# checkout's reattn/kernels symlink (a clean clone has none).
IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.so", "*.egg-info", "__pycache__",
                                ".pytest_cache", "results")

IMPORTS = """
import importlib.metadata, json, torch, reattn, reattn.kernels, reattn._C
print(json.dumps({"reattn": reattn.__file__, "kernels": reattn.kernels.__file__, "_C": reattn._C.__file__,
                  "version": reattn.__version__, "dist_version": importlib.metadata.version("reattn"),
                  "torch": torch.__version__, "extension": reattn.extension_info()}))
"""

SMOKE = """
import torch, reattn
from reattn._extension import _C
q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
expected = torch.logsumexp(0.5 * q @ k.transpose(-2, -1), -1)
assert torch.allclose(_C.row_logsumexp(q, k, 0.5), expected)
module = reattn.ReAttention(48, 6).train()
out = module(torch.randn(2, 9, 48))
out.sum().backward()
assert out.shape == (2, 9, 48) and int(module.var_norm.num_batches_tracked) == 1
try:
    reattn.re_attention(q, k, k, torch.eye(3, dtype=torch.float64), backend="triton")
except ValueError as e:
    print("triton:", e)
try:
    import kernels
except ImportError:
    print("no top-level kernels package")
print("smoke ok")
"""

VERSIONS = ("import importlib.metadata as m, torch; "
            "print(m.version('pip'), m.version('setuptools'), torch.__version__, torch.version.cuda)")


def torch_lower_bound() -> str:
    """The x in pyproject.toml's ``torch>=x``: the oldest torch the package claims, which is tested here."""
    import tomllib  # Python 3.11+, as the test environment (the CPU torch wheel is cp311)

    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [r for r in requirements if r.replace(" ", "").startswith("torch>=")]
    return torch_requirement.replace(" ", "")[len("torch>="):]


class StepFailed(Exception):
    pass


def run(step: str, cmd, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    """Run one command of a step and report it (one ``INSTALL`` line); raise StepFailed if it failed."""
    start = time.perf_counter()
    try:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
        rc, out, err = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "")
        result = None
    line = dict(step=step, cmd=" ".join(map(str, cmd)), rc=rc, seconds=round(time.perf_counter() - start, 1),
                stdout=out, stderr=err)
    print("INSTALL " + json.dumps(line), flush=True)
    if rc != 0:
        raise StepFailed(step)
    return result


def copy_sources(destination: Path) -> Path:
    shutil.copytree(REPO, destination, ignore=IGNORE, symlinks=True)
    kernels_link = destination / "reattn" / "kernels"
    if kernels_link.is_symlink():
        kernels_link.unlink()
    return destination


def make_venv(root: Path) -> Path:
    base_python = getattr(sys, "_base_executable", sys.executable)
    run("venv", [base_python, "-m", "venv", root / "venv"])
    python = root / "venv" / "bin" / "python"
    pip_version = run("venv", [python, "-m", "pip", "--version"]).stdout.split()[1]
    if pip_version != PIP_VERSION:
        run("venv", [python, "-m", "pip", "install", "-q", f"pip=={PIP_VERSION}"])
    run("venv", [python, "-m", "pip", "install", "-q", "--upgrade", "setuptools", "wheel", "ninja"])
    torch_spec = os.environ.get("REATTN_CPU_TORCH_SPEC", f"torch=={torch_lower_bound()}")
    # --no-compile: pip would byte-compile torch's Python files (~22 -> ~16 CPU-s for the install, measured on
    # the dev machine); the tests import a few of them, which Python compiles on first import anyway.
    run("venv", [python, "-m", "pip", "install", "-q", "--no-compile", torch_spec])
    run("venv: versions", [python, "-c", VERSIONS])
    return python


def editable(python: Path, root: Path, env: dict) -> None:
    src = copy_sources(root / "src")
    run("editable: build", [python, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", "."], cwd=src, env=env)
    run("editable: imports", [python, "-c", IMPORTS], cwd=root)
    (src / "kernels" / "_added_after_install.py").write_text("VALUE = 42\n")
    run("editable: added module", [python, "-c", "from reattn.kernels._added_after_install import VALUE; print(VALUE)"],
        cwd=root)


def sdist_archive(python: Path, root: Path) -> Path:
    """The source distribution of a fresh copy of the sources."""
    src = copy_sources(root / "sdist-src")
    dist = root / "dist"
    made = run("sdist: build_sdist",
               [python, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
               cwd=src)
    return dist / made.stdout.strip().splitlines()[-1]


def sdist_install(python: Path, root: Path, archive: Path, env: dict, cache: Path) -> None:
    """The editable install's sources replaced by the unpacked sdist (the same folder, so the compile cache
    can match), the wheel pip builds from it, installed over the editable install."""
    shutil.rmtree(root / "src")
    unpacked = root / "unpacked"
    run("sdist: unpack", [python, "-m", "tarfile", "-e", archive, unpacked])
    (top,) = unpacked.iterdir()
    top.rename(root / "src")
    wheels = root / "wheels"
    run("sdist: build", [python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", wheels,
                         root / "src"], cwd=root, env=env)
    run("sdist: compile cache", ["cat", cache / "log"])
    (wheel,) = wheels.glob("reattn-*.whl")
    run("sdist: install", [python, "-m", "pip", "install", "--no-deps", wheel], cwd=root)
    run("sdist: imports", [python, "-c", IMPORTS], cwd=root)
    run("sdist: installed kernels",
        [python, "-c", "import os, sysconfig; d = os.path.join(sysconfig.get_paths()['purelib'], 'reattn', 'kernels'); "
                       "print(d); print(*sorted(os.listdir(d)))"], cwd=root)
    run("sdist: smoke", [python, "-c", SMOKE], cwd=root)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="reattn-install-"))
    try:
        try:
            python = make_venv(root)
            archive = sdist_archive(python, root)
        except StepFailed:
            return 1
        from tests._compile_cache import write_launcher

        cache = root / "compile-cache"
        (root / "bin").mkdir()
        env = dict(os.environ, CXX=write_launcher(str(cache), os.environ.get("CXX", "c++"), str(root / "bin" / "cxx"),
                                                  extra=OPTIMIZE))
        failed = 0
        try:
            editable(python, root, env)
        except StepFailed:
            failed = 1
        try:
            sdist_install(python, root, archive, env, cache)
        except StepFailed:
            failed = 1
        return failed
    finally:
        if os.environ.get("REATTN_KEEP_INSTALL_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)


def _parse(returncode, out, err):
    """{step: [its INSTALL lines]} of the background process, with its return code and stderr tail."""
    steps = {}
    for line in out.splitlines():
        if line.startswith("INSTALL "):
            record = json.loads(line[len("INSTALL "):])
            steps.setdefault(record["step"], []).append(record)
    return dict(returncode=returncode, steps=steps, stderr=err)


_JOB = None


def start(max_jobs: int):
    """Start the installs in the background (idempotent); ``max_jobs`` compiles at a time."""
    global _JOB
    if _JOB is None:
        from tests._background import Background

        _JOB = Background("tests._install_run", parse=_parse, env={"MAX_JOBS": str(max_jobs)})
    return _JOB.start()


def results(timeout=3000) -> dict:
    """The parsed outcome (see _parse), waiting for the process; started here if conftest did not."""
    start(max_jobs=2)
    return _JOB.results(timeout)


if __name__ == "__main__":
    sys.exit(main())
