"""Older timm releases installed side by side and tests/_timm_swap_check.py run against each, in a background
thread (tests/test_swap_timm_versions.py asserts on the outcome).

Each release is pip-installed with ``--no-deps --target`` into a cache directory (``$REATTN_TIMM_CACHE``,
default ``~/.cache/reattn-timm``; 0.5 - 2.6 MB per wheel, reused between runs), then the check script runs
in a subprocess with ``PYTHONPATH=<that dir>:<repo>``, using this environment's torch. tests/conftest.py
starts the thread at collection with the selected releases: each check imports torch and timm (~5 s of one
core), which the rest of the suite mostly leaves idle; each test waits for its release.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, Sequence

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tests" / "_timm_swap_check.py"
CACHE = Path(os.environ.get("REATTN_TIMM_CACHE") or Path.home() / ".cache" / "reattn-timm")


def install(version: str) -> Path:
    """timm==version in CACHE/version (installed once; a partial install never lands there)."""
    target = CACHE / version
    if (target / "timm" / "__init__.py").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=CACHE))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                 "--no-deps", "--target", str(staging), f"timm=={version}"],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"could not pip-install timm=={version} (this test needs the package index; run "
                               f"`pytest -m 'not install'` offline):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            staging.rename(target)
        except OSError:  # another run installed it meanwhile
            if not (target / "timm" / "__init__.py").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check(version: str) -> dict:
    """Install the release and run the check script against it: its path and output, or the error."""
    try:
        path = install(version)
    except Exception as error:  # reported by the release's test
        return dict(error=str(error))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(path), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    result = subprocess.run([sys.executable, str(CHECK), version], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)
    return dict(path=path, returncode=result.returncode, stdout=result.stdout, stderr=result.stderr)


_RESULTS: Dict[str, dict] = {}
_THREADS: Dict[str, threading.Thread] = {}
_LOCK = threading.Lock()


def start(versions: Sequence[str]) -> None:
    """Check these releases one after another in a background thread (a release already started is skipped)."""
    with _LOCK:
        todo = [v for v in versions if v not in _THREADS]
        if not todo:
            return

        def run_all():
            for version in todo:
                _RESULTS[version] = check(version)

        thread = threading.Thread(target=run_all, name="timm releases", daemon=True)
        for version in todo:
            _THREADS[version] = thread
        thread.start()


def result(version: str, timeout: float = 1800) -> dict:
    """The release's outcome (see ``check``), waiting for it; started here if conftest did not."""
    start([version])
    _THREADS[version].join(timeout)
    if version not in _RESULTS:
        raise TimeoutError(f"timm {version}: the background check did not finish in {timeout:.0f} s")
    return _RESULTS[version]
