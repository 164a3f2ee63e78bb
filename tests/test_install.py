"""The package installs as the README says, with the oldest pip and torch the project supports.

The installs run in one background process, tests/_install_run.py (its docstring lists the steps),
started by tests/conftest.py at collection, so that its two builds of reattn._C's CPU part overlap the
rest of the suite; the tests here wait for it and check what each step printed:

* a fresh virtual environment: pip 23.2.1, current setuptools with ``wheel`` present, and the oldest
  torch ``pyproject.toml`` claims, from its CPU-only wheel;
* the editable install ``pip install --no-build-isolation -e .``: ``reattn``, ``reattn.kernels`` and
  ``reattn._C`` import from the copy of the sources, and a file added to ``kernels/`` is seen without
  reinstalling;
* a regular install from the source distribution: its build preprocesses to the same objects (a compile
  cache hands it the editable build's), the same imports from site-packages, every module of ``kernels/``
  installed as ``reattn.kernels``, no stray top-level ``kernels`` package, and a smoke run of the CPU part.

Marked ``install``: it downloads setuptools, wheel and ninja from the package index and builds reattn._C
(the second build from the compile cache);
``-m "not install"`` deselects it. The CPU torch wheel must be reachable by pip (here: its find-links
folder); ``REATTN_CPU_TORCH_SPEC`` overrides the requirement, e.g. to point at a wheel file.
"""
import json
from pathlib import Path

import pytest

from tests import _install_run

pytestmark = pytest.mark.install

REPO = _install_run.REPO


def release(version: str) -> tuple:
    """(major, minor, micro) of a version such as 2.13 or 2.13.0+cpu."""
    numbers = tuple(int(part) for part in version.split("+")[0].split("."))
    return (numbers + (0, 0, 0))[:3]


@pytest.fixture(scope="module")
def outcome():
    return _install_run.results()


def step(outcome: dict, name: str) -> dict:
    """The last command of a step, which must have run and succeeded (else its output is the failure)."""
    records = outcome["steps"].get(name)
    failed = [r for runs in outcome["steps"].values() for r in runs if r["rc"] != 0]
    assert records, (f"step {name!r} did not run", [(r["cmd"], r["stderr"][-4000:]) for r in failed[-1:]]
                     or outcome["stderr"])
    for record in records:
        assert record["rc"] == 0, f"{record['cmd']} failed:\n{record['stdout'][-6000:]}\n{record['stderr'][-4000:]}"
    return records[-1]


def imports(outcome: dict, name: str) -> dict:
    """What ``import reattn, reattn.kernels, reattn._C`` found, run outside the sources."""
    return json.loads(step(outcome, name)["stdout"].strip().splitlines()[-1])


def check_imports(found: dict, reattn_dir: Path, kernels_dir: Path) -> None:
    assert Path(found["reattn"]) == reattn_dir / "__init__.py", found
    assert Path(found["kernels"]) == kernels_dir / "__init__.py", found
    assert Path(found["_C"]).parent == reattn_dir, found
    assert found["version"] == found["dist_version"], found  # the one version source, read by setuptools
    assert found["extension"]["cuda"] is False and found["extension"]["openmp"] is True, found
    assert found["extension"]["torch_version"] == found["torch"].split("+")[0], found


def built_cpu_part_only(record: dict) -> None:
    assert "has no CUDA: building the CPU part of reattn._C only" in record["stdout"] + record["stderr"], \
        record["stdout"][-6000:]


def test_environment_has_the_oldest_pip_and_torch_claimed(outcome):
    pip, _setuptools, torch_version, cuda = step(outcome, "venv: versions")["stdout"].split()
    bound = _install_run.torch_lower_bound()
    assert pip == _install_run.PIP_VERSION
    assert release(torch_version) == release(bound) and cuda == "None", \
        f"expected the CPU-only torch {bound}, got {torch_version} (CUDA {cuda})"


def test_editable_install(outcome):
    build = step(outcome, "editable: build")
    built_cpu_part_only(build)
    print(f"editable install ({build['cmd']}): {build['seconds']:.0f} s")

    # The sources are imported where they are, reattn._C built in place beside them.
    found = imports(outcome, "editable: imports")
    src = Path(found["reattn"]).parents[1]
    assert src.name == "src", found
    check_imports(found, reattn_dir=src / "reattn", kernels_dir=src / "kernels")

    # Editable: a module added to the sources is importable without reinstalling.
    assert step(outcome, "editable: added module")["stdout"].strip() == "42"


def test_regular_install_from_sdist(outcome):
    assert ".tar.gz " in step(outcome, "sdist: unpack")["cmd"]
    build = step(outcome, "sdist: build")
    built_cpu_part_only(build)
    print(f"regular install from the sdist ({build['cmd']}): {build['seconds']:.0f} s")
    # The sdist's sources preprocess to what the checkout's did: its build takes every object of the
    # editable build from the compile cache (tests/_compile_cache.py) and compiles nothing.
    log = step(outcome, "sdist: compile cache")["stdout"].split("\n")
    misses = [line for line in log if line.startswith("miss ")]
    hits = [line for line in log if line.startswith("hit ")]
    assert misses and len(hits) == len(misses), log

    site_kernels, listing = step(outcome, "sdist: installed kernels")["stdout"].strip().splitlines()
    site = Path(site_kernels).parents[1]
    check_imports(imports(outcome, "sdist: imports"), reattn_dir=site / "reattn", kernels_dir=site / "reattn" / "kernels")
    installed = set(listing.split())
    for module in sorted((REPO / "kernels").glob("*.py")):  # every module of the kernels, whatever they are named
        assert module.name in installed, module.name

    smoke = step(outcome, "sdist: smoke")["stdout"]
    assert "smoke ok" in smoke
    assert "triton:" in smoke and "cannot run" in smoke
    assert "no top-level kernels package" in smoke
