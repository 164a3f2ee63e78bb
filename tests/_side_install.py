"""A release of a package pip-installed with ``--no-deps --target`` into a cache directory, beside the
environment's own (older timm releases: tests/_timm_releases.py; the GPU machines' Triton:
tests/_triton_release.py), for a process that puts that directory first on its path."""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def install(cache: Path, package: str, version: str, timeout: float = 600) -> Path:
    """``package==version`` in cache/version (installed once; a partial install never lands there)."""
    target = cache / version
    if (target / package / "__init__.py").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                 "--no-deps", "--target", str(staging), f"{package}=={version}"],
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"could not pip-install {package}=={version} (this test needs the package index; "
                               f"run `pytest -m 'not install'` offline):\n{result.stdout[-2000:]}\n"
                               f"{result.stderr[-2000:]}")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            staging.rename(target)
        except OSError:  # another run installed it meanwhile
            if not (target / package / "__init__.py").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
