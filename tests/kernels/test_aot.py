"""Every Triton kernel compiles ahead of time for sm_80, sm_86 and sm_90 and fits their shared memory.

The compiles run in a background process started by tests/conftest.py (see tests/_aot.py).
"""
import pytest

from reattn.kernels.aot import ELEMENT_SIZE, SHARED_MEMORY_LIMIT
from reattn.kernels.launch import shared_bytes
from tests import _aot


def test_every_kernel_compiles_for_sm80_sm86_and_sm90_within_shared_memory():
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    expected = _aot.jobs()
    assert len(results) == len(expected), (len(results), len(expected), stderr)
    for job, result in zip(expected, results):
        print(result)
        assert {k: result[k] for k in job} == job
        assert 0 < result["shared"] <= SHARED_MEMORY_LIMIT[result["cap"]], result
    kernels = {r["kernel"] for r in results}
    assert kernels == {"forward", "bn_stats", "backward"}


def test_the_launch_rules_shared_memory_table_bounds_the_compiler():
    """launch.shared_bytes (what the rule assumes a configuration needs) >= what Triton compiled."""
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    chunked = [r for r in results if r["D_CHUNKS"] > 1]
    assert {r["kernel"] for r in chunked} == {"forward", "bn_stats", "backward"}  # the split is compiled too
    assert "fp32" in {r["dtype"] for r in results}  # the element-size factor is checked too
    for r in results:
        assumed = shared_bytes(r["kernel"], r["HP"], r["BLOCK_D"], r["D_CHUNKS"] > 1, ELEMENT_SIZE[r["dtype"]])
        assert r["shared"] <= assumed, (r, assumed)


def test_compile_kernel_rejects_unknown_kernels():
    from reattn.kernels.aot import compile_kernel

    with pytest.raises(ValueError, match="kernel must be forward, bn_stats or backward"):
        compile_kernel("sideways", 6, 64, 197, 90)
