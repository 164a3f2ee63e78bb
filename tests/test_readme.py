"""Every code block of README.md runs as written.

The blocks are read from README.md itself. ```python blocks run each in a fresh interpreter (as a
reader pasting one block would), from a scratch directory; ```bash blocks are make commands, checked
with ``make -n`` (the targets exist and their recipes expand: running them would install and
benchmark); ```text blocks are formulas. A block of any other kind fails the test, so a new block
cannot go unchecked.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def test_every_block_has_a_known_kind():
    kinds = [kind for kind, _, _ in blocks()]
    assert kinds.count("python") >= 3 and "bash" in kinds
    assert set(kinds) <= {"python", "bash", "text"}, kinds


@pytest.mark.parametrize("code, line", [(code, line) for kind, code, line in blocks() if kind == "python"],
                         ids=lambda value: f"line{value}" if isinstance(value, int) else "")
def test_python_block_runs(code, line, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README.md block at line {line} failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("code, line", [(code, line) for kind, code, line in blocks() if kind == "bash"],
                         ids=lambda value: f"line{value}" if isinstance(value, int) else "")
def test_bash_block_is_make_commands_that_expand(code, line):
    commands = [c.split("#")[0].strip() for c in code.splitlines() if c.split("#")[0].strip()]
    assert commands, f"README.md block at line {line} is empty"
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "make", f"README.md line {line}: only make commands are checked here, got {command!r}"
        result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr[-2000:]}"
        assert "pip install" in result.stdout or "pytest" in result.stdout or "bench" in result.stdout, result.stdout
