"""The package installs as the README says, with the oldest pip and torch the project supports.

One fresh virtual environment for the module, made with the standard library's ``venv`` and pip
23.2.1 (Python 3.11's own; pinned to it where the interpreter ships another), the current setuptools
and ``wheel`` (with both present, pip 23.2.1 took a project without ``pyproject.toml`` down the legacy
``setup.py develop`` path, which setuptools >= 80 re-runs as a pip install *with* build isolation,
where torch is missing), ninja, and the oldest torch ``pyproject.toml`` claims, from its CPU-only
wheel. Then, each from a fresh copy of the sources (so the checkout and its in-tree ``reattn/_C*.so``
are left alone):

* the editable install ``pip install --no-build-isolation -e .``: ``reattn``, ``reattn.kernels`` and
  ``reattn._C`` import from the copy, and a file added to ``kernels/`` is seen without reinstalling;
* a regular install from the source distribution (``pip install --no-build-isolation reattn-*.tar.gz``,
  which also checks that the sdist holds everything the build needs): the same imports from
  site-packages, no stray top-level ``kernels`` package, and a smoke run of the CPU part.

Marked ``install``: it downloads setuptools, wheel and ninja from the package index and takes a few
minutes (two builds of the CPU part of reattn._C); ``-m "not install"`` deselects it. The CPU torch
wheel must be reachable by pip (here: its find-links folder); ``REATTN_CPU_TORCH_SPEC`` overrides the
requirement, e.g. to point at a wheel file.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[1]
PIP_VERSION = "23.2.1"  # Python 3.11's own pip, the oldest the install is tested with

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


def torch_lower_bound() -> str:
    """The x in pyproject.toml's ``torch>=x``: the oldest torch the package claims, which is tested here."""
    import tomllib  # Python 3.11+, as the test environment (the CPU torch wheel is cp311)

    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [r for r in requirements if r.replace(" ", "").startswith("torch>=")]
    return torch_requirement.replace(" ", "")[len("torch>="):]


def release(version: str) -> tuple:
    """(major, minor, micro) of a version such as 2.13 or 2.13.0+cpu."""
    numbers = tuple(int(part) for part in version.split("+")[0].split("."))
    return (numbers + (0, 0, 0))[:3]


def run(cmd, timeout=1800, **kwargs):
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-4000:]}")
    result.seconds = time.perf_counter() - start
    return result


def imports(python: Path, cwd: Path) -> dict:
    """What ``import reattn, reattn.kernels, reattn._C`` finds, run from ``cwd`` (outside the sources)."""
    out = run([python, "-c", IMPORTS], cwd=cwd).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_imports(found: dict, reattn_dir: Path, kernels_dir: Path) -> None:
    assert Path(found["reattn"]) == reattn_dir / "__init__.py", found
    assert Path(found["kernels"]) == kernels_dir / "__init__.py", found
    assert Path(found["_C"]).parent == reattn_dir, found
    assert found["version"] == found["dist_version"], found  # the one version source, read by setuptools
    assert found["extension"]["cuda"] is False and found["extension"]["openmp"] is True, found
    assert found["extension"]["torch_version"] == found["torch"].split("+")[0], found


def copy_sources(destination: Path) -> Path:
    shutil.copytree(REPO, destination, ignore=IGNORE, symlinks=True)
    kernels_link = destination / "reattn" / "kernels"
    if kernels_link.is_symlink():
        kernels_link.unlink()
    return destination


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment: pip 23.2.1, current setuptools, wheel and ninja, the oldest claimed torch."""
    root = tmp_path_factory.mktemp("install")
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, "-m", "venv", root / "venv"])
    python = root / "venv" / "bin" / "python"
    pip_version = run([python, "-m", "pip", "--version"]).stdout.split()[1]
    if pip_version != PIP_VERSION:
        run([python, "-m", "pip", "install", "-q", f"pip=={PIP_VERSION}"])
    run([python, "-m", "pip", "install", "-q", "--upgrade", "setuptools", "wheel", "ninja"])
    bound = torch_lower_bound()
    torch_spec = os.environ.get("REATTN_CPU_TORCH_SPEC", f"torch=={bound}")
    run([python, "-m", "pip", "install", "-q", torch_spec])
    versions = run([python, "-c", "import importlib.metadata as m, torch; print(m.version('pip'), "
                                  "m.version('setuptools'), torch.__version__, torch.version.cuda)"]).stdout.split()
    assert versions[0] == PIP_VERSION, versions
    assert release(versions[2]) == release(bound) and versions[3] == "None", f"expected the CPU-only torch {bound}: {versions}"
    return python


def test_editable_install(venv, tmp_path):
    src = copy_sources(tmp_path / "src")
    build = run([venv, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", "."], cwd=src,
                env={**os.environ, "MAX_JOBS": "2"})
    assert "has no CUDA: building the CPU part of reattn._C only" in build.stdout + build.stderr
    print(f"editable install (pip install --no-build-isolation -e .): {build.seconds:.0f} s")

    # The sources are imported where they are, reattn._C built in place beside them.
    check_imports(imports(venv, cwd=tmp_path), reattn_dir=src / "reattn", kernels_dir=src / "kernels")

    # Editable: a module added to the sources is importable without reinstalling.
    (src / "kernels" / "_added_after_install.py").write_text("VALUE = 42\n")
    probe = run([venv, "-c", "from reattn.kernels._added_after_install import VALUE; print(VALUE)"], cwd=tmp_path)
    assert probe.stdout.strip() == "42"


def test_regular_install_from_sdist(venv, tmp_path):
    src = copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    sdist = run([venv, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
                cwd=src).stdout.strip().splitlines()[-1]
    build = run([venv, "-m", "pip", "install", "-v", "--no-build-isolation", dist / sdist], cwd=tmp_path,
                env={**os.environ, "MAX_JOBS": "2"})
    assert "has no CUDA: building the CPU part of reattn._C only" in build.stdout + build.stderr
    print(f"regular install from the sdist (pip install --no-build-isolation {sdist}): {build.seconds:.0f} s")

    site = Path(run([venv, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    check_imports(imports(venv, cwd=tmp_path), reattn_dir=site / "reattn", kernels_dir=site / "reattn" / "kernels")
    for module in sorted((REPO / "kernels").glob("*.py")):  # every module of the kernels, whatever they are named
        assert (site / "reattn" / "kernels" / module.name).is_file(), module.name

    smoke = run([venv, "-c", SMOKE], cwd=tmp_path)
    assert "smoke ok" in smoke.stdout
    assert "triton:" in smoke.stdout and "cannot run" in smoke.stdout
    assert "no top-level kernels package" in smoke.stdout
