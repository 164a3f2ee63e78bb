"""Test-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, at collection start. Likewise the CUDA C++
backend runs CPU tensors in its host emulator (REATTN_CUDA_EMULATE=1).
"""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("REATTN_CUDA_EMULATE", "1")


def pytest_configure(config):
    # The background jobs' files (tests/_background.py): one directory per session, made by the process that
    # controls it (under pytest-xdist, before its workers start: they inherit the variable).
    if not hasattr(config, "workerinput") and "REATTN_TEST_JOBS" not in os.environ:
        config._reattn_jobs = tempfile.mkdtemp(prefix="reattn-test-jobs-")
        os.environ["REATTN_TEST_JOBS"] = config._reattn_jobs


def pytest_unconfigure(config):
    jobs = getattr(config, "_reattn_jobs", None)
    if jobs:
        shutil.rmtree(jobs, ignore_errors=True)
        os.environ.pop("REATTN_TEST_JOBS", None)


# Test files whose tests wait for a background job (tests/_background.py): run last, so that under
# pytest-xdist no worker waits for a job while other tests remain.
WAITS_FOR_BACKGROUND = ("tests/kernels/test_aot.py", "tests/kernels/test_triton_release.py",
                        "tests/benchmarks/test_static_model.py", "tests/test_swap_timm_versions.py",
                        "tests/test_install.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.nodeid.startswith(WAITS_FOR_BACKGROUND))  # stable: the rest keep their order


def pytest_collection_finish(session):
    # The ahead-of-time compiles are slow and independent of the other tests: start them now.
    if any(item.nodeid.startswith("tests/kernels/test_aot.py") for item in session.items):
        from tests import _aot

        _aot.start()
    # The GPU machines' Triton release: installed beside the project's, the kernels compiled with it, likewise.
    if any(item.nodeid.startswith("tests/kernels/test_triton_release.py") for item in session.items):
        from tests import _triton_release

        _triton_release.start()
    # The static model's checks that compile kernels, likewise (tests/benchmarks/_compiled_checks.py).
    if any(item.nodeid.startswith("tests/benchmarks/test_static_model.py") for item in session.items):
        from tests.benchmarks import _compiled_checks

        _compiled_checks.start()
    # The 2-process synchronized-statistics run (tests/test_distributed.py), likewise.
    if any(item.nodeid.startswith("tests/test_distributed.py") for item in session.items):
        from tests import test_distributed

        test_distributed.job().start()
    # The older timm releases' checks (tests/test_swap_timm_versions.py), likewise.
    releases = [item.callspec.params["version"] for item in session.items
                if item.nodeid.startswith("tests/test_swap_timm_versions.py")]
    if releases:
        from tests import _timm_releases

        _timm_releases.start(releases)
    # The install tests' venv and two builds (tests/_install_run.py): one compile at a time beside the
    # other tests, which leave a core idle most of the time; two when they run alone.
    installs = [item for item in session.items if item.nodeid.startswith("tests/test_install.py")]
    if installs:
        from tests import _install_run

        _install_run.start(max_jobs=2 if len(installs) == len(session.items) else 1)
