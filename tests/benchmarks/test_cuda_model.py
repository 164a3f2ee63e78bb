"""The CUDA side of the static model: the extension's programs emulated from their SASS.

Needs reattn._C built with CUDA (the cubins); without it these skip (the build without CUDA has no
programs to model). The problem is small, so a full emulation is cheap enough to check the
extrapolation over key tiles the model uses at the benchmark shapes.
"""
import pytest
import torch

from reattn._extension import _C

pytestmark = pytest.mark.skipif(_C is None or not _C.build_info().get("cuda"),
                                reason="reattn._C was built without CUDA: no cubin to model")


def test_launches_per_norm_mode_follow_ops_cpp():
    from benchmarks import cuda_side

    kinds = {}
    for norm in ("none", "batch-eval", "batch-train", "layer"):
        steps = cuda_side.cuda_call(2, 3, 40, 16, norm, 90)
        kinds[norm] = {phase: [x.kind for x in items if isinstance(x, cuda_side.Launch)]
                       for phase, items in steps.items()}
    fwd, stats, bwd, bwd_stats = (cuda_side.PROGRAM_KINDS[k] for k in ("forward", "batch_stats", "backward",
                                                                        "backward_stats"))
    for norm in ("none", "batch-eval", "layer"):
        assert kinds[norm] == {"fwd": [fwd], "bwd": [bwd]}
    assert kinds["batch-train"] == {"fwd": [fwd], "bwd": [bwd_stats, bwd]}
    launch = [x for x in cuda_side.cuda_call(2, 3, 40, 16, "batch-train", 90)["fwd"]
              if isinstance(x, cuda_side.Launch)][0]
    assert launch.params.out_is_acc and launch.params.moments  # the one-sweep forward with moments
    assert launch.grid == (2 * launch.params.plan.num_m, launch.params.plan.num_chunks)


@pytest.mark.parametrize("kind_name", ["forward", "backward"])
def test_extrapolating_over_key_tiles_matches_a_full_emulation(kind_name):
    from benchmarks import cuda_side, sass_exec

    steps = cuda_side.cuda_call(1, 2, 56, 16, "layer", 90)
    launch = [x for ph in ("fwd", "bwd") for x in steps[ph] if isinstance(x, cuda_side.Launch)
              and x.kind == cuda_side.PROGRAM_KINDS[kind_name]][0]
    extrapolated, diag, _ = cuda_side.program_counts(launch, 90)
    assert not diag.unmodelled
    functions, _ = cuda_side._functions(90, cuda_side.extension_path())
    fn = functions[cuda_side.kernel_symbol(launch.dtype, launch.kind)]
    p = launch.params
    const = cuda_side._const_bank(p, 90, (p.plan.num_m, p.plan.num_chunks))
    full = sass_exec.run_block(fn, const, cuda_side.THREADS, (0, 0, 0), (p.plan.num_m, p.plan.num_chunks, 1),
                               int(p.plan.shared_bytes), 90, banks=fn.banks)
    # 56 keys = 4 tiles of 16 (the last partial), extrapolated from sweeps of 2 and 3 tiles: exact.
    assert sum(full.issued.values()) == pytest.approx(sum(extrapolated.values()), rel=1e-9)
    for address, n in full.issued.items():
        assert extrapolated.get(address, 0.0) == pytest.approx(n, abs=1e-6), hex(address)


def test_model_of_a_cuda_launch():
    from benchmarks import cuda_side
    from benchmarks.cost_model import H100_SXM

    launch = [x for x in cuda_side.cuda_call(2, 3, 40, 16, "layer", 90)["fwd"] if isinstance(x, cuda_side.Launch)][0]
    model = cuda_side.model_launch(launch, 90)
    assert model.threads == 128 and model.registers > 0 and model.spill_bytes == 0
    assert model.shared_bytes == launch.params.plan.shared_bytes + 1024  # sm_90's static reservation
    # The staging loads are global; the WMMA operand loads (generic addresses) go to shared memory.
    assert model.work.instructions["tensor"] > 0 and model.work.l2_bytes > 0 and model.work.shared_bytes > 0
    t = model.times(H100_SXM)
    assert 0 < t.t_low_us <= t.t_high_us
