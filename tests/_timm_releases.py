"""Older timm releases installed side by side and tests/_timm_swap_check.py run against each, in a background
process (tests/test_swap_timm_versions.py asserts on the outcome).

Each release is pip-installed with ``--no-deps --target`` into a cache directory (``$REATTN_TIMM_CACHE``,
default ``~/.cache/reattn-timm``; 0.5 - 2.6 MB per wheel, reused between runs), then the check script runs
in a process of its own with ``<that dir>:<repo>`` first on its path, using this environment's torch: a
fork of this process, which has imported torch (and nothing of timm or reattn) once for all of them, as
``python <script>`` with ``PYTHONPATH=<that dir>:<repo>`` would import it (6 checks: 24.8 -> 12.5 CPU-s,
measured on the dev machine). tests/conftest.py starts the process at collection with the selected releases;
each test waits for its release.
"""
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from tests import _side_install

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tests" / "_timm_swap_check.py"
CACHE = Path(os.environ.get("REATTN_TIMM_CACHE") or Path.home() / ".cache" / "reattn-timm")


def install(version: str) -> Path:
    """timm==version in CACHE/version (``tests._side_install``)."""
    return _side_install.install(CACHE, "timm", version)


def check(version: str) -> dict:
    """Install the release and run the check script against it: its path and output, or the error."""
    try:
        path = install(version)
    except Exception as error:  # reported by the release's test
        return dict(error=str(error))
    returncode, stdout, stderr = run_forked(path, version)
    return dict(path=path, returncode=returncode, stdout=stdout, stderr=stderr)


def run_forked(path: Path, version: str, timeout: float = 600):
    """(returncode, stdout, stderr) of ``PYTHONPATH=<path>:<repo> python CHECK version``, run in a fork of this
    process after it imported torch: the child puts what the interpreter would on ``sys.path`` (the script's
    folder, then the PYTHONPATH entries) and runs the script as ``__main__``; timm is imported only there."""
    import torch  # noqa: F401  (once here; the checks' own `import torch` finds it)

    assert "timm" not in sys.modules and "reattn" not in sys.modules, "the checks must import their own"
    entries = [str(path), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(REPO)
                os.environ["PYTHONPATH"] = os.pathsep.join(entries)
                sys.path[:0] = [str(CHECK.parent)] + os.pathsep.join(entries).split(os.pathsep)
                sys.argv = [str(CHECK), version]
                runpy.run_path(str(CHECK), run_name="__main__")
                code = 0
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"timm {version}: {CHECK.name} did not finish in {timeout:.0f} s")
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return (os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))


def _parse(returncode, out, err):
    """{version: its outcome (see ``check``)} from the job's ``TIMM {json}`` lines, with "path" a Path again."""
    results = {}
    for line in out.splitlines():
        if line.startswith("TIMM "):
            record = json.loads(line[len("TIMM "):])
            if "path" in record:
                record["path"] = Path(record["path"])
            results[record.pop("version")] = record
    return dict(returncode=returncode, results=results, stderr=err)


_JOB = None


def start(versions: Sequence[str]) -> None:
    """Check these releases one after another in a background process (tests/_background.py: one per session,
    whichever pytest-xdist worker asks first)."""
    global _JOB
    if _JOB is None:
        from tests._background import Background

        _JOB = Background("tests._timm_releases", *versions, parse=_parse)
    _JOB.start()


def result(version: str, timeout: float = 1800) -> dict:
    """The release's outcome (see ``check``), waiting for the job; started here if conftest did not."""
    start([version])
    outcome = _JOB.results(timeout)
    if version not in outcome["results"]:
        raise RuntimeError(f"timm {version}: the background job did not check it (exit status "
                           f"{outcome['returncode']}):\n{outcome['stderr']}")
    return outcome["results"][version]


def main(versions: Sequence[str]) -> int:
    for version in versions:
        record = dict(check(version), version=version)
        if "path" in record:
            record["path"] = str(record["path"])
        print("TIMM " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
