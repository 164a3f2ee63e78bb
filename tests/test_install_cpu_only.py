"""reattn builds and works against a CPU-only torch (torch==2.13.0 CPU wheel).

Builds the package in a second virtual environment (``.venv-cpu-only`` in the repository, git
ignored and reused between runs) with ``pip install --no-build-isolation``, then runs a smoke
script there: the extension holds the CPU part only, and the eager path and module work.
Marked ``install`` (about 2 minutes the first time); deselect with ``-m "not install"`` on a
machine without the CPU wheel.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-cpu-only"
TORCH_SPEC = os.environ.get("REATTN_CPU_TORCH_SPEC", "torch==2.13.0")

SMOKE = """
import torch, reattn
assert torch.version.cuda is None, f"expected a CPU-only torch, got CUDA {torch.version.cuda}"
info = reattn.extension_info()
assert info["cuda"] is False and info["openmp"] is True, info
assert info["torch_version"] == torch.__version__.split("+")[0], info
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
print("cpu-only ok", torch.__version__)
"""


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.install
def test_builds_and_runs_against_cpu_only_torch(tmp_path):
    python = VENV / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    has_torch = subprocess.run([str(python), "-c", "import torch; assert torch.version.cuda is None"],
                               capture_output=True).returncode == 0
    if not has_torch:
        run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"])
        run([str(python), "-m", "pip", "install", "-q", TORCH_SPEC, "numpy"])
    # Build from a copy of the sources, so in-tree build artefacts of the main environment
    # (an editable install puts its _C*.so in reattn/) cannot leak into this build.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.so", "*.egg-info", "__pycache__", "results"))
    build = run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--force-reinstall",
                 "-v", str(src)], env={**os.environ, "MAX_JOBS": "2"})
    assert "has no CUDA: building the CPU part of reattn._C only" in build.stdout + build.stderr
    smoke = run([str(python), "-c", SMOKE], cwd=tmp_path)
    assert "cpu-only ok 2.13.0" in smoke.stdout
    assert "triton:" in smoke.stdout and "cannot run" in smoke.stdout
