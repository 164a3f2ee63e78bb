"""A sample of the Triton launches compiles ahead of time for sm_80 and sm_90, within their shared memory
and the shared memory the launch rules assume (``launch.shared_bytes``), and reproduces the launch scan's
record where the scan has the launch.

The compiles run in two background processes started by tests/conftest.py (tests/_aot.py says what the
sample holds and why); every configuration the rules pick for sm_90 and sm_86 is in the scan's record,
checked without compiling by tests/kernels/test_launch_scan.py.
"""
import pytest

from reattn.kernels.aot import ELEMENT_SIZE, SHARED_MEMORY_LIMIT
from reattn.kernels.launch import (TileConfig, head_dim_tail, shared_bytes, splits_backward_heads, splits_softmax_stats,
                                  variant_of)
from tests import _aot

KERNELS = {"_softmax_stats_kernel": "softmax_stats", "_re_attention_fwd_kernel": "forward", "_gram_kernel": "gram",
           "_re_attention_bwd_dq_kernel": "dq", "_re_attention_bwd_dkdv_kernel": "dkdv"}


def _config(r):
    return TileConfig(HP=r["HP"], G=r["G"], BLOCK_M=r["BLOCK_M"], BLOCK_N=r["BLOCK_N"], BLOCK_D=r["BLOCK_D"],
                      STATS_BLOCK_N=r.get("STATS_BLOCK_N", 16), num_warps=r["num_warps"], num_stages=r["num_stages"])


def test_every_launch_compiles_within_the_gpus_shared_memory():
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    for job in _aot.jobs():  # every job compiled each of its launches
        job = {"dtype": "bf16", **job}  # a job without a dtype is bf16 (not also the fp32 job of its shape)
        mine = [r for r in results if all(r.get(k) == v for k, v in job.items())]
        # a forward without a mask or dropout in 16-bit launches the softmax statistics kernel first (scale 0.125)
        splits = job["call"] == "forward" and splits_softmax_stats(
            variant_of(job["norm"], job["mask"], job["dropout"]), ELEMENT_SIZE[job["dtype"]], 0.125, job["h"],
            -(-job["d"] // 16) * 16)
        assert len(mine) == (2 if job["call"] == "backward" else 1) + splits, (job, mine, stderr)
    for r in results:
        print(r)
        assert 0 < r["shared"] <= SHARED_MEMORY_LIMIT[r["cap"]], r
    assert {r["kernel"] for r in results} == set(KERNELS)


def test_the_compiles_reproduce_the_launch_scans_record():
    """Compiled here as the scan compiled them (the same Triton): the same registers, spills, shared memory and
    cache key as its rows, so the record the scan tests read stands for what this Triton builds."""
    import triton

    from tests.kernels.known_spills import recorded_rows

    if triton.__version__ != "3.9.0":
        pytest.skip(f"the scan was compiled with Triton 3.9.0; this is {triton.__version__}")
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    rows = {(int(r["cap"]), r["call"], r["variant"], int(r["h"]), int(r["d"]), r["kernel"]): r
            for r in recorded_rows()}
    compared = 0
    for r in results:
        variant = _aot.scanned_variant(r)
        if variant is None:
            continue
        row = rows[(r["cap"], r["call"], variant, r["h"], r["d"], KERNELS[r["kernel"]])]
        recorded = {k: row[k] for k in ("registers", "spill_bytes", "shared")}
        assert {k: str(r[k]) for k in recorded} == recorded, (r, row)
        assert r["cache_key"] == row["cache_key"], ("rerun python -m benchmarks.launch_scan", r, row)
        compared += 1
    assert compared == 5  # DeiT-S's softmax statistics and forward, dQ, dK/dV and Gram sweep


def test_the_launch_rules_shared_memory_bound_holds_for_every_compiled_launch():
    """launch.shared_bytes (what the rules assume a configuration needs) >= what Triton compiled."""
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    assert any(r["D_CHUNKS"] > 1 for r in results)  # head-dim chunks are compiled too
    for r in results:
        if r["dtype"] != "bf16":
            continue  # the rules' fp32 tiles are narrow on purpose; their bound is the same formula
        split = r["call"] == "backward" and splits_backward_heads(
            r["h"], -(-r["d"] // 16) * 16, norm=r["norm"], masked=r["mask"], has_dropout=r["dropout"],
            element_size=ELEMENT_SIZE[r["dtype"]], kernel=KERNELS[r["kernel"]],
            interpret=False)  # (DeepViT-L-384's backward)
        bound = shared_bytes(KERNELS[r["kernel"]], _config(r), ELEMENT_SIZE[r["dtype"]], masked=r["mask"],
                             split_heads=split, d_tail=head_dim_tail(-(-r["d"] // 16) * 16))
        assert r["shared"] <= bound, (r, bound)


# fp32 inputs take CUDA-core products (tl.dot in IEEE fp32 unless the caller allows TF32) over fp32
# operand tiles: twice the registers of bf16 ones, so the fp32 launches spill (dK/dV at 16 slots: 1,624 B
# per thread, 8 warps: launch.FP32_WARPS). Measured by this sample; the README's Triton row says so.
FP32_SPILL_CEILING = 1_624


@pytest.mark.parametrize("kernel", ["_softmax_stats_kernel", "_re_attention_fwd_kernel", "_re_attention_bwd_dq_kernel",
                                    "_re_attention_bwd_dkdv_kernel"])  # the sample's Gram sweeps all mask
def test_plain_launches_spill_nothing_at_eight_slots_and_stay_within_the_scans_ceilings(kernel):
    """Without a mask or dropout (every norm mode), bf16 launches of 5-8 heads (one batch row per
    program) at head dims up to 64 and the softmax statistics kernel (one head per program) at every
    head dim spill nothing; every other plain launch of the sample (16 and 32 slots, D = 128,
    DeepViT-L's N = 577) stays within its class's ceiling in the launch scan's record
    (the most a known spill of the class spills: tests/kernels/known_spills.py), and fp32 launches within
    FP32_SPILL_CEILING."""
    from tests.kernels.known_spills import class_ceiling, spill_class

    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    plain = [r for r in results if r["kernel"] == kernel and not r["mask"] and not r["dropout"]]
    assert plain
    fp32 = [r["spill_bytes"] for r in plain if r["dtype"] == "fp32"]
    if kernel == "_re_attention_bwd_dkdv_kernel":  # the ceiling is today's most, not slack
        assert max(fp32) == FP32_SPILL_CEILING
    for r in plain:
        if r["dtype"] == "fp32":
            assert r["spill_bytes"] <= FP32_SPILL_CEILING, r
        elif kernel == "_softmax_stats_kernel":
            assert r["spill_bytes"] == 0, r
        elif r["HP"] == 8 and r["G"] == 1 and r["d"] <= 64:
            assert r["spill_bytes"] == 0, r
        else:
            assert r["spill_bytes"] <= class_ceiling(spill_class(r["HP"], False, r["d"])), r


# The sample's fp32 launch with the most live state (sm_80, 32 heads, LayerNorm, a mask and dropout: the
# forward) spills the most: the README's Triton row says how much.
FP32_HEAVY_SPILL_CEILING = 3_808


def test_fp32_launches_with_a_mask_and_dropout_stay_within_their_ceiling():
    returncode, results, stderr = _aot.results()
    assert returncode == 0, stderr
    heavy = [r["spill_bytes"] for r in results if r["dtype"] == "fp32" and (r["mask"] or r["dropout"])]
    assert heavy and max(heavy) == FP32_HEAVY_SPILL_CEILING  # today's most, not slack


def test_compile_call_rejects_unknown_calls():
    from reattn.kernels.aot import compile_call

    with pytest.raises(ValueError, match="call must be one of"):
        compile_call("sideways", 6, 64, 197, 90)
