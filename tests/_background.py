"""A Python module run once in a background process during the test session (compiles that need Triton
without its interpreter, started at collection by tests/conftest.py), its output parsed when a test asks."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Background:
    def __init__(self, *args: str, parse, env=None):
        self.args = args
        self.parse = parse  # (returncode, stdout, stderr) -> result
        self.env = env or {}  # set in the process's environment, over the session's
        self.process = None
        self.result = None

    def start(self):
        """Start the process (idempotent), without Triton's interpreter."""
        if self.process is None:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            env.update(self.env)
            self.process = subprocess.Popen([sys.executable, "-m", *self.args], cwd=REPO, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.process

    def results(self, timeout: float):
        """The parsed output, waiting for the process."""
        if self.result is None:
            out, err = self.start().communicate(timeout=timeout)
            self.result = self.parse(self.process.returncode, out, err[-4000:])
        return self.result
