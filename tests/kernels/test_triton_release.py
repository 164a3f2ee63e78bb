"""The kernels compile with the GPU machines' Triton release (3.6.0; the project's environment has 3.9) for
sm_90, each launch within the GPU's shared memory: what a GPU session runs (tests/_triton_release.py installs
the release beside the project's own and compiles in a background process started by tests/conftest.py).

Marked ``install``: it needs the package index the first time. Without it the test fails with the pip error
(it never skips); deselect with ``-m "not install"`` (``make test-fast``) offline.
"""
import pytest

from reattn.kernels.aot import SHARED_MEMORY_LIMIT
from tests import _triton_release

pytestmark = pytest.mark.install

# The kernels each call launches (without a mask or dropout a 16-bit forward runs the softmax statistics first).
KERNELS = {"forward": {"_softmax_stats_kernel", "_re_attention_fwd_kernel"},
           "moments": {"_softmax_stats_kernel", "_re_attention_fwd_kernel"},
           "backward": {"_re_attention_bwd_dq_kernel", "_re_attention_bwd_dkdv_kernel"},
           "gram": {"_gram_kernel"}, "bn_grad_sums": {"_re_attention_bwd_dq_kernel"}}


def test_the_gpu_machines_triton_compiles_every_launch():
    returncode, version, results, stderr = _triton_release.results()
    assert returncode == 0, stderr
    # the release itself, from the cache, not the environment's Triton
    assert version is not None and version["version"] == _triton_release.VERSION, (version, stderr)
    assert version["file"].startswith(str(_triton_release.CACHE)), version
    for job in _triton_release.jobs():
        mine = [r for r in results if all(r.get(k) == v for k, v in job.items())]
        expected = set(KERNELS[job["call"]])
        if job["call"] == "forward" and job["mask"]:
            expected.discard("_softmax_stats_kernel")  # with a mask the forward's first sweep is its own
        assert {r["kernel"] for r in mine} == expected and len(mine) == len(expected), (job, mine, stderr)
    for r in results:
        print(r)
        assert 0 < r["shared"] <= SHARED_MEMORY_LIMIT[90], r
