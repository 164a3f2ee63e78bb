"""The compiled extension reattn._C: how it was built, its CPU row-statistics kernel, OpenMP."""
import subprocess
import sys

import pytest
import torch

import reattn
from reattn._extension import _C
from tests._build import expected_cuda_archs


def test_extension_is_built_and_reports_its_build():
    info = reattn.extension_info()
    assert set(info) == {"cuda", "cuda_archs", "openmp", "torch_version"}
    assert info["openmp"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]
    # setup.py builds the CUDA part whenever the installed torch has CUDA.
    assert info["cuda"] is (torch.version.cuda is not None)
    if info["cuda"]:  # the archs setup.py read from REATTN_CUDA_ARCHS (default 80;90), comma-separated
        assert info["cuda_archs"] == ",".join(expected_cuda_archs())


def test_parallel_for_uses_more_than_one_thread():
    # Compiled and linked with -fopenmp: at::parallel_for spreads work over torch's threads.
    if torch.get_num_threads() < 2:
        pytest.fail(f"this machine gives torch {torch.get_num_threads()} thread(s); the test needs 2")
    assert _C.parallel_thread_count(16) >= 2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("shape", [(2, 6, 1, 1, 32), (2, 12, 33, 17, 35), (1, 6, 197, 197, 64)])
def test_cpu_row_logsumexp(dtype, tol, shape):
    B, H, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Nk, H, D, generator=g).to(dtype).transpose(1, 2)  # non-contiguous strides
    out = _C.row_logsumexp(q, k, 0.17)
    expected = torch.logsumexp(0.17 * q.double() @ k.double().transpose(-2, -1), dim=-1)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_cpu_row_logsumexp_rejects_bad_input():
    with pytest.raises(RuntimeError, match="q must be \\[B, H, Nq, D\\]"):
        _C.row_logsumexp(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), 1.0)
    with pytest.raises(RuntimeError, match="must agree on B, H and D"):
        _C.row_logsumexp(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6), 1.0)
    with pytest.raises(RuntimeError, match="supports float32, float64 and bfloat16"):
        _C.row_logsumexp(torch.randn(1, 1, 2, 2).half(), torch.randn(1, 1, 2, 2).half(), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
def test_cuda_row_logsumexp_matches_torch():
    q = torch.randn(2, 12, 197, 35, device="cuda", dtype=torch.float64)
    k = torch.randn(2, 12, 150, 35, device="cuda", dtype=torch.float64)
    expected = torch.logsumexp(0.3 * q @ k.transpose(-2, -1), dim=-1)
    torch.testing.assert_close(_C.row_logsumexp(q, k, 0.3), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_C.row_logsumexp(q.float(), k.float(), 0.3), expected.float(), rtol=1e-5, atol=1e-5)


def test_package_works_without_the_extension():
    # Import reattn in a process where reattn._C cannot load: the eager path still runs and the
    # backends that need the extension say why.
    script = (
        "import sys\n"
        "class NoExtension:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'reattn._C':\n"
        "            raise ImportError('simulated: extension not built')\n"
        "sys.meta_path.insert(0, NoExtension())\n"
        "import torch, reattn\n"
        "from reattn._extension import extension_error_message\n"
        "assert reattn._extension._C is None\n"
        "msg = extension_error_message(); assert 'reattn._C failed to import (simulated' in msg, msg\n"
        "q = torch.randn(1, 2, 3, 4)\n"
        "out = reattn.re_attention(q, q, q, torch.eye(2), backend='auto')\n"
        "assert out.shape == (1, 2, 3, 4)\n"
        "try:\n"
        "    reattn.re_attention(q, q, q, torch.eye(2), backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert 'reattn._C failed to import' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('backend=cpu ran without the extension')\n"
        "try:\n"
        "    reattn.extension_info()\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e)\n"
        "else:\n"
        "    raise SystemExit('extension_info did not raise')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
