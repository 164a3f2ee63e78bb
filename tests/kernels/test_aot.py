"""Every Triton launch compiles ahead of time for sm_80, sm_86 and sm_90, within their shared memory,
and within the shared memory the launch rules assume (``launch.shared_bytes``).

The compiles run in two background processes started by tests/conftest.py (see tests/_aot.py).
"""
import pytest

from reattn.kernels.aot import ELEMENT_SIZE, SHARED_MEMORY_LIMIT
from reattn.kernels.launch import TileConfig, shared_bytes
from tests import _aot

KERNELS = {"_re_attention_fwd_kernel": "forward", "_gram_kernel": "gram", "_re_attention_bwd_dq_kernel": "dq",
           "_re_attention_bwd_dkdv_kernel": "dkdv"}


def _config(r):
    return TileConfig(HP=r["HP"], G=r["G"], BLOCK_M=r["BLOCK_M"], BLOCK_N=r["BLOCK_N"], BLOCK_D=r["BLOCK_D"],
                      STATS_BLOCK_N=r.get("STATS_BLOCK_N", 16), num_warps=r["num_warps"], num_stages=r["num_stages"])


def test_every_launch_compiles_within_the_gpus_shared_memory():
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    for job in _aot.jobs():  # every job compiled each of its launches
        job = {"dtype": "bf16", **job}  # a job without a dtype is bf16 (not also the fp32 job of its shape)
        mine = [r for r in results if all(r.get(k) == v for k, v in job.items())]
        assert len(mine) == (2 if job["call"] == "backward" else 1), (job, mine, stderr)
    for r in results:
        print(r)
        assert 0 < r["shared"] <= SHARED_MEMORY_LIMIT[r["cap"]], r
    assert {r["kernel"] for r in results} == set(KERNELS)


def test_the_launch_rules_shared_memory_bound_holds_for_every_compiled_launch():
    """launch.shared_bytes (what the rules assume a configuration needs) >= what Triton compiled."""
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    assert any(r["D_CHUNKS"] > 1 for r in results)  # head-dim chunks are compiled too
    for r in results:
        if r["dtype"] != "bf16":
            continue  # the rules' fp32 tiles are narrow on purpose; their bound is the same formula
        bound = shared_bytes(KERNELS[r["kernel"]], _config(r), ELEMENT_SIZE[r["dtype"]], masked=r["mask"])
        assert r["shared"] <= bound, (r, bound)


# fp32 inputs take CUDA-core products (tl.dot in IEEE fp32 unless the caller allows TF32) over fp32
# operand tiles: twice the registers of bf16 ones, so the fp32 launches spill, most where ptxas
# falls back to 32 registers (dQ at 16 slots: 10,280 B per thread). Measured by this sample; the
# README's Triton row says so.
FP32_SPILL_CEILING = 10_280


@pytest.mark.parametrize("kernel", ["_re_attention_fwd_kernel", "_re_attention_bwd_dq_kernel",
                                    "_re_attention_bwd_dkdv_kernel"])  # the sample's Gram sweeps all mask
def test_plain_launches_spill_nothing_at_eight_slots_and_stay_within_the_scans_ceilings(kernel):
    """Without a mask or dropout (every norm mode), bf16 launches of 5-8 heads (one batch row per
    program) at head dims up to 64 spill nothing; every other plain launch of the sample (16 and 32
    slots, D = 128, DeepViT-L's N = 577) stays within its class's ceiling in the launch scan's record
    (the most a known spill of the class spills: tests/kernels/known_spills.py), and fp32 launches within
    FP32_SPILL_CEILING."""
    from tests.kernels.known_spills import class_ceiling, spill_class

    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    plain = [r for r in results if r["kernel"] == kernel and not r["mask"] and not r["dropout"]]
    assert plain
    fp32 = [r["spill_bytes"] for r in plain if r["dtype"] == "fp32"]
    if kernel == "_re_attention_bwd_dq_kernel":  # the ceiling is today's most, not slack
        assert max(fp32) == FP32_SPILL_CEILING
    for r in plain:
        if r["dtype"] == "fp32":
            assert r["spill_bytes"] <= FP32_SPILL_CEILING, r
        elif r["HP"] == 8 and r["G"] == 1 and r["d"] <= 64:
            assert r["spill_bytes"] == 0, r
        else:
            assert r["spill_bytes"] <= class_ceiling(spill_class(r["HP"], False, r["d"])), r


def test_compile_call_rejects_unknown_calls():
    from reattn.kernels.aot import compile_call

    with pytest.raises(ValueError, match="call must be one of"):
        compile_call("sideways", 6, 64, 197, 90)
