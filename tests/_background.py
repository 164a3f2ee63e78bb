"""A Python module run once per test session in a background process (compiles that need Triton without its
interpreter, installs, older timm releases), started at collection by tests/conftest.py, its output parsed when
a test asks.

Under pytest-xdist every worker collects the same tests and so asks to start the same jobs, and the worker
whose test reads a job's output need not be the one that started it. A job therefore lives in files: the
session's job directory (``$REATTN_TEST_JOBS``, made by tests/conftest.py in the controlling process before
the workers start) holds ``<name>.lock`` (created exclusively: the first worker to ask starts the job, the
others find it started), ``<name>.out`` and ``<name>.err`` (its stdout and stderr) and ``<name>.rc`` (its exit
status, written last, by a rename: once it exists the output is complete). ``python -m tests._background
DIR NAME MODULE ARGS...`` is the small runner that writes them.
"""
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS_ENV = "REATTN_TEST_JOBS"


def jobs_dir() -> str:
    """The session's job directory; made here (one per process) when conftest did not make one."""
    path = os.environ.get(JOBS_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="reattn-test-jobs-")
        os.environ[JOBS_ENV] = path
    return path


class Background:
    def __init__(self, *args: str, parse, env=None, name=None):
        self.args = args  # python -m <args>
        self.name = name or args[0]  # of its files: one job per name and session
        self.parse = parse  # (returncode, stdout, stderr) -> result
        self.env = env or {}  # set in the process's environment, over the session's
        self.result = None

    def _path(self, suffix: str) -> str:
        return os.path.join(jobs_dir(), self.name + suffix)

    def start(self) -> bool:
        """Start the job unless a process of this session already did (idempotent); True if this call started
        it. It runs without Triton's interpreter and in its own session, so it outlives the worker that started
        it while another worker waits for it."""
        try:
            os.close(os.open(self._path(".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env.update(self.env)
        subprocess.Popen([sys.executable, "-m", "tests._background", jobs_dir(), self.name, *self.args], cwd=REPO,
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        return True

    def results(self, timeout: float):
        """The parsed output, waiting up to ``timeout`` seconds for the job (started here if nobody did)."""
        if self.result is None:
            self.start()
            rc_path = self._path(".rc")
            deadline = time.monotonic() + timeout
            while not os.path.exists(rc_path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"background job {self.name} did not finish in {timeout:.0f} s "
                                       f"(its output so far: {self._path('.out')})")
                time.sleep(0.5)
            with open(rc_path) as f:
                returncode = int(f.read())
            with open(self._path(".out")) as f:
                out = f.read()
            with open(self._path(".err")) as f:
                err = f.read()
            self.result = self.parse(returncode, out, err[-4000:])
        return self.result


def _run(directory: str, name: str, args) -> int:
    """Run ``python -m args`` with its output in DIR/NAME.out and .err, then write NAME.rc by a rename."""
    base = os.path.join(directory, name)
    with open(base + ".out", "w") as out, open(base + ".err", "w") as err:
        returncode = subprocess.call([sys.executable, "-m", *args], stdout=out, stderr=err, cwd=REPO)
    with open(base + ".rc.tmp", "w") as f:
        f.write(str(returncode))
    os.replace(base + ".rc.tmp", base + ".rc")
    return returncode


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2], sys.argv[3:]))
