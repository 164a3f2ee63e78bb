"""What the fused GPU backends, backend="triton" and backend="cuda", share beyond the contract of every
fused backend (tests/backends/test_conformance.py, with the CPU kernel): their ops' fake
implementations, the synchronized BatchNorm steps (Gram sums -> statistics -> forward with given
statistics, the backward with given sums) in one process and their opcheck, training BatchNorm's one
sweep over the keys, eval-mode BatchNorm's inference op, head dims over 64, the 2x rule in bfloat16 and
float16, refusals, and backend="auto". Without a GPU the Triton kernels run in Triton's interpreter and
the CUDA programs in their host emulator (tests/conftest.py), so shapes are small; on a GPU the same tests run the compiled
kernels. Ahead-of-time GPU compiles of the Triton kernels are in tests/kernels/test_aot.py; what is
specific to the CUDA programs (emulator races, plans, compiled resources) in test_cuda_backend.py.
"""
import pytest
import torch

# The Triton kernels (and the dropout pattern the CUDA programs share with them) need triton, which
# torch's CPU-only wheels do not bring (make install TORCH=cpu): then this module skips, saying so.
pytest.importorskip("triton", reason="triton is not installed (a CPU-only torch)")

import reattn
from reattn.backends.cuda import CUDA_OPS, cuda_forward
from reattn.backends.triton import TRITON_OPS, triton_forward
from tests._tolerance import reduction_length, within_twice_eager
from tests.backends._contract import DEVICE, GRAD_NAMES, assert_same, masks, problem, run, run_both

FORWARD_OPS = {"triton": triton_forward, "cuda": cuda_forward}
OPS = {"triton": TRITON_OPS, "cuda": CUDA_OPS}
# The softmax statistics the ops pass to the backward (FusedKernels.softmax_stats_shape) for q
# [2, 6, 9, D]: the row max and log-sum, Triton's as [2, B, H, Nq], CUDA's as [B, H, Nq, 2].
SOFTMAX_STATS_SHAPE = {"triton": (2, 2, 6, 9), "cuda": (2, 6, 9, 2)}


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,masked", [("none", False), ("layer", False), ("batch-train", False), ("batch-train", True),
                                         ("layer", True)])
def test_low_precision_forward_and_backward_within_twice_eager_error(backend, dtype, norm, masked):
    assert_within_twice_eager_error(backend, dtype, norm, masked)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU fp16 takes the tensor-core operands anyway (the test above)")
@pytest.mark.parametrize("norm,masked", [("none", False), ("layer", False), ("batch-train", False), ("layer", True)])
def test_triton_fp16_tensor_core_operands_within_twice_eager_error(monkeypatch, norm, masked):
    # The GPU's fp16 products (DOT_LOWP) forced on in the interpreter, whose fp16 arithmetic is faithful (its
    # bf16 is not, hence off by default there): on an H200 the backward mixed fp16 gradients with bf16
    # operands, and dQ, dK erred ~3x eager's fp16 error.
    import reattn.kernels.backward as kernels_backward
    import reattn.kernels.forward as kernels_forward
    import reattn.kernels.gram as kernels_gram

    original = kernels_forward.launch_options

    def tensor_core_operands(q, lowp_dot, allow_tf32, interpret):
        return original(q, True if lowp_dot is None else lowp_dot, allow_tf32, interpret)

    for module in (kernels_forward, kernels_backward, kernels_gram):
        monkeypatch.setattr(module, "launch_options", tensor_core_operands)
    assert kernels_forward.launch_options(torch.empty(1, dtype=torch.float16), None, False, True)["DOT_LOWP"]
    assert_within_twice_eager_error("triton", torch.float16, norm, masked)


def assert_within_twice_eager_error(backend, dtype, norm, masked):
    B, H, N, D = 2, 6, 17, 32
    tensors64, stats = problem(B, H, N, N, D)
    extra = dict(attn_mask=masks(B, H, N, N)["bool"]) if masked else {}
    low = {n: t.detach().to(dtype).requires_grad_(True) for n, t in tensors64.items()}
    stats_low = {n: s.float() for n, s in stats.items()}  # running statistics stay fp32 beside half inputs
    grad = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = run("eager", norm, tensors64, {n: s.clone() for n, s in stats.items()}, **extra)
    ref_grads = torch.autograd.grad(ref, [tensors64[n] for n in ("q", "k", "v")], grad)
    errors = {}
    for name in (backend, "eager"):
        out = run(name, norm, low, {n: s.clone() for n, s in stats_low.items()}, **extra)
        grads = torch.autograd.grad(out, [low[n] for n in ("q", "k", "v")], grad.to(dtype))
        errors[name] = [(out.double() - ref).abs().max().item()] + [
            (g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    magnitudes = [ref.abs().max().item()] + [r.abs().max().item() for r in ref_grads]
    n = reduction_length(B, H, N, N, D)
    for what, kernel_err, eager_err, mag in zip(("out", "dq", "dk", "dv"), errors[backend], errors["eager"],
                                                magnitudes):
        assert within_twice_eager(kernel_err, eager_err, dtype, n, mag), (what, kernel_err, eager_err)


def test_fake_implementation_gives_shapes_and_dtypes(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 6, 9, 32, dtype=torch.bfloat16)
        k = torch.empty(2, 6, 11, 32, dtype=torch.bfloat16)
        w = torch.empty(6, 6)
        out, lse, stats, R, U = FORWARD_OPS[backend](q, k, k, w, None, None, None, None, None, 0.1, 1.0, "none", 1e-5,
                                                     0.0)
    assert out.shape == (2, 6, 9, 32) and out.dtype == torch.bfloat16
    assert lse.shape == SOFTMAX_STATS_SHAPE[backend] and lse.dtype == torch.float32
    assert stats.shape == (0, 6) and stats.dtype == torch.float64  # statistics only for training BatchNorm
    assert R.shape == U.shape == (0, 6, 9, 32)  # the backward sums come from a sweep of their own


def test_fake_implementations_of_the_synchronized_steps(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = OPS[backend]
    with FakeTensorMode():
        q = torch.empty(2, 6, 9, 32, dtype=torch.bfloat16)
        k = torch.empty(2, 6, 11, 32, dtype=torch.bfloat16)
        w = torch.empty(6, 6)
        lse, s1, gram, count = ops.gram_sums(q, k, None, None, 0.1, 0.0, 1.0 / 11)
        stats = torch.empty(3, 6, dtype=torch.float64)
        R = U = torch.empty(0, 6, 9, 32)
        sums = ops.bn_grad_sums(q, q, k, k, w, None, None, None, None, None, lse, stats, R, U, 0.1, 1.0, 1e-5, 0.0)
        grads = ops.backward(q, q, k, k, w, None, None, None, None, None, lse, stats, R, U, 0.1, 1.0, "batch", 1e-5,
                             0.0, sums)
    assert lse.shape == SOFTMAX_STATS_SHAPE[backend] and lse.dtype == torch.float32
    assert (s1.shape, gram.shape, count.shape, sums.shape) == ((1, 6), (1, 6, 6), (1,), (2, 6))
    assert s1.dtype == gram.dtype == count.dtype == sums.dtype == torch.float64
    # the absent mix_bias, norm_weight and norm_bias get empty gradients (autograd drops them)
    assert [tuple(g.shape) for g in grads] == [(2, 6, 9, 32), (2, 6, 11, 32), (2, 6, 11, 32), (6, 6), (0,), (0,), (0,)]


def _synchronized_steps(ops, tensors, mask, scale, out_scale, eps):
    """The synchronized path's steps in one process: Gram sums -> statistics -> forward with them."""
    from reattn._batchnorm import gram_shift, unmasked_count
    from reattn.distributed import gram_batch_statistics

    q, k, v, w, c, nw, nb = (tensors[n].detach() for n in GRAD_NAMES)
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    lse, s1, gram, count = ops.gram_sums(q, k, mask, None, scale, 0.0, gram_shift(Nk))
    assert count.item() == unmasked_count(mask, B, Nq, Nk).item()
    stats = torch.stack(gram_batch_statistics(w, c, s1, gram, count, gram_shift(Nk)))
    forward_args = (q, k, v, w, c, nw, nb, mask, None, scale, out_scale, "batch", eps, 0.0)
    return forward_args, lse, stats


def test_local_training_batchnorm_takes_one_sweep_over_the_keys(backend, monkeypatch):
    # Both backends: the forward kernel's moments, one sweep over the keys (the Gram statistics sweep
    # serves synchronized statistics only); float64 eager agreement with every mask kind.
    import reattn.backends._fused as fused

    calls = []
    original = fused.one_sweep_batchnorm
    monkeypatch.setattr(fused, "one_sweep_batchnorm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    B, H, Nq, Nk, D = 2, 3, 5, 7, 6
    tensors, stats = problem(B, H, Nq, Nk, D)
    shared_float = masks(B, H, Nq, Nk)["float per head"][:1]  # [1, Nq, Nk]: the same for every head
    for mask in (None, masks(B, H, Nq, Nk)["bool"], shared_float):
        extra = {} if mask is None else dict(attn_mask=mask)
        out, ref, stats_t, stats_e = run_both(backend, "batch-train", tensors, stats, **extra)
        assert_same(out, ref, stats_t, stats_e, tensors, "batch-train")
    assert len(calls) == 3


def test_synchronized_steps_reproduce_the_local_call(backend):
    """Gram sums -> statistics -> forward with given statistics, and the backward with given sums, equal the
    one-call forward and backward (the synchronized path over one process, without the collectives)."""
    B, H, Nq, Nk, D = 2, 3, 5, 6, 4
    tensors, _ = problem(B, H, Nq, Nk, D)
    ops = OPS[backend]
    mask = masks(B, H, Nq, Nk)["bool"]
    forward_args, lse, stats = _synchronized_steps(ops, tensors, mask, 0.4, 0.7, 1e-5)
    ref_out, ref_lse, ref_stats, R, U = ops.forward(*forward_args)
    out, lse_out, stats_out, _, _ = ops.forward(*forward_args, lse, stats)
    for name, a, b in (("out", out, ref_out), ("lse", lse_out, ref_lse), ("stats", stats_out, ref_stats)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    q, k, v, w, c, nw, nb, *_ = forward_args
    grad = torch.randn_like(q)
    backward_args = (grad, q, k, v, w, c, nw, nb, mask, None, lse, stats, R, U, 0.4, 0.7, "batch", 1e-5, 0.0)
    ref = ops.backward(*backward_args)
    sums = ops.bn_grad_sums(grad, q, k, v, w, c, nw, nb, mask, None, lse, stats, R, U, 0.4, 0.7, 1e-5, 0.0)
    got = ops.backward(*backward_args, sums)
    for name, a, b in zip(GRAD_NAMES[:5], got[:5], ref[:5]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # Given sums, the norm's own gradients are the caller's (its own sums): the op returns zeros.
    assert not got[5].any() and not got[6].any()
    torch.testing.assert_close(sums[0], ref[5], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums[1], ref[6], rtol=1e-12, atol=1e-12)


def test_triton_one_sweep_batchnorm_takes_u_from_the_forward(monkeypatch):
    """The Triton forward sums V over the keys (U) in rows past Nq of its last program where it can
    (``kernels.forward.sums_values``: here the split sweep at 12 heads, which the statistics launch of 16-bit
    inputs selects; forced for float64), and one-sweep BatchNorm then takes that U for the finish and keeps it
    for the backward, with no sum over V of its own: output, running statistics and every gradient as float64
    eager's."""
    import reattn.backends.triton as triton_backend
    import reattn.kernels.forward as fwd_module

    monkeypatch.setattr(fwd_module, "splits_softmax_stats", lambda *a, **kw: True)
    sums = []
    real = triton_backend.re_attention_forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs.get("value_sums"):
            sums.append(result[3])
        return result

    monkeypatch.setattr(triton_backend, "re_attention_forward", spy)
    B, H, Nq, Nk, D = 2, 12, 17, 19, 16
    tensors, stats = problem(B, H, Nq, Nk, D)
    out, ref, stats_t, stats_e = run_both("triton", "batch-train", tensors, stats)
    assert len(sums) == 1 and sums[0] is not None and sums[0].shape == (B, H, 1, D)
    torch.testing.assert_close(sums[0], tensors["v"].detach().sum(dim=2, keepdim=True), rtol=1e-13, atol=1e-13)
    assert_same(out, ref, stats_t, stats_e, tensors, "batch-train")


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool, one row for all queries"])
def test_backward_sums_from_the_one_sweep_terms_equal_the_sums_sweep(backend, mask_kind):
    """Local training BatchNorm without a mask keeps X V [B, H, Nq, D] (q's dtype) and U = V summed over the keys
    [B, H, 1, D] where the backend fuses their passes (head_affine and head_dot_sums: kernels/affine.py,
    csrc/cuda/head_affine.cuh); the backward's sums from them (xhat V's formed from X V and U, with dropout's
    nonzero mean(X)) equal the sweep over the keys that recomputes the map, which with a mask (nothing kept: X V
    stays in the accumulation dtype) or given statistics (the synchronized path, R and U empty) still runs."""
    B, H, Nq, Nk, D = 2, 3, 5, 6, 4
    tensors, _ = problem(B, H, Nq, Nk, D)
    ops = OPS[backend]
    mask = {"none": None, "bool": masks(B, H, Nq, Nk)["bool"],
            "bool, one row for all queries": masks(B, H, Nq, Nk)["bool"][:, :, :1]}[mask_kind]
    q, k, v, w, c, nw, nb = (tensors[n].detach() for n in GRAD_NAMES)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    out, lse, stats, R, U = ops.forward(q, k, v, w, c, nw, nb, mask, seed, 0.4, 0.7, "batch", 1e-5, 0.25)
    # the op's fake gives R and U the same shapes and dtypes (torch.compile traces through it)
    torch.library.opcheck(ops.forward, (q, k, v, w, c, nw, nb, mask, seed, 0.4, 0.7, "batch", 1e-5, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    grad = torch.randn_like(q)
    args = (grad, q, k, v, w, c, nw, nb, mask, seed, lse, stats)
    sweep = ops.bn_grad_sums(*args, R[:0], U[:0], 0.4, 0.7, 1e-5, 0.25)
    if mask is not None:
        assert R.shape == (0, H, Nq, D) and U.shape == (0, H, Nq, D)
    else:
        assert R.shape == (B, H, Nq, D) and R.dtype == q.dtype
        assert U.shape == (B, H, 1, D) and U.dtype == torch.float64
        from_terms = ops.bn_grad_sums(*args, R, U, 0.4, 0.7, 1e-5, 0.25)
        torch.testing.assert_close(from_terms, sweep, rtol=1e-12, atol=1e-12)
    _, _, _, R_given, U_given = ops.forward(q, k, v, w, c, nw, nb, mask, seed, 0.4, 0.7, "batch", 1e-5, 0.25,
                                            lse, stats)
    assert R_given.shape[0] == 0 and U_given.shape[0] == 0


def test_given_statistics_are_checked_and_not_differentiated_alone(backend):
    B, H, Nq, Nk, D = 1, 2, 3, 4, 4
    tensors, _ = problem(B, H, Nq, Nk, D)
    ops = OPS[backend]
    forward_args, lse, stats = _synchronized_steps(ops, tensors, None, 0.4, 1.0, 1e-5)
    with pytest.raises(ValueError, match="softmax_in and stats_in go together, with norm='batch' only"):
        ops.forward(*forward_args, lse, None)
    with pytest.raises(ValueError, match="softmax_in and stats_in go together, with norm='batch' only"):
        ops.forward(*forward_args[:11], "layer", *forward_args[12:], lse, stats)
    q = tensors["q"].detach().clone().requires_grad_()
    out, _, _, _, _ = ops.forward(q, *forward_args[1:], lse, stats)
    with pytest.raises(RuntimeError, match=r"sync_group=...\), not on its own"):
        out.sum().backward()


def test_synchronized_steps_pass_opcheck(backend):
    """Schema, fake implementations and dispatch of the ops the synchronized path uses (torch.library.opcheck)."""
    B, H, Nq, Nk, D = 1, 2, 3, 4, 4
    tensors, _ = problem(B, H, Nq, Nk, D)
    ops = OPS[backend]
    mask = masks(B, H, Nq, Nk)["bool"]
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    q, k = tensors["q"].detach(), tensors["k"].detach()
    torch.library.opcheck(ops.gram_sums, (q, k, mask, seed, 0.4, 0.2, 1.0 / Nk))
    forward_args, lse, stats = _synchronized_steps(ops, tensors, mask, 0.4, 0.7, 1e-5)
    schema_and_fake = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.forward, forward_args + (lse, stats), test_utils=schema_and_fake)
    q, k, v, w, c, nw, nb, *_ = forward_args
    grad = torch.randn_like(q)
    _, _, _, R, U = ops.forward(*forward_args)
    sums_args = (grad, q, k, v, w, c, nw, nb, mask, None, lse, stats, R, U, 0.4, 0.7, 1e-5, 0.0)
    torch.library.opcheck(ops.bn_grad_sums, sums_args)
    backward_args = (grad, q, k, v, w, c, nw, nb, mask, None, lse, stats, R, U, 0.4, 0.7, "batch", 1e-5, 0.0,
                     ops.bn_grad_sums(*sums_args))
    torch.library.opcheck(ops.backward, backward_args, test_utils=schema_and_fake)


@pytest.mark.parametrize("D", [96, 128])
def test_head_dims_over_64_split_the_backward_into_chunks(D):
    from reattn.kernels.launch import backward_config

    # two [16, rows, BLOCK_D] accumulators at <= 64 registers: D / 32 programs per query block
    assert backward_config(197, 197, D, 16, interpret=False).BLOCK_D == 32
    assert backward_config(197, 197, 64, 16, interpret=False).BLOCK_D == 32
    assert backward_config(197, 197, 64, 8, interpret=False).BLOCK_D == 64
    tensors, stats = problem(1, 3, 5, 7, D)
    out, ref, stats_t, stats_e = run_both("triton", "layer", tensors, stats, attn_mask=masks(1, 3, 5, 7)["bool"])
    assert_same(out, ref, stats_t, stats_e, tensors, "layer")


def test_refusals_say_why(backend):
    B, H, Nq, Nk, D = 2, 3, 5, 7, 8
    tensors, stats = problem(B, H, Nq, Nk, D)
    per_head = masks(B, H, Nq, Nk)["float per head"]
    with pytest.raises(ValueError, match="training-mode BatchNorm with an attn_mask that differs per head"):
        run(backend, "batch-train", tensors, stats, attn_mask=per_head)
    with pytest.raises(ValueError, match="gradients with respect to attn_mask"):
        run(backend, "layer", tensors, stats, attn_mask=per_head.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="more than one unmasked value per head"):
        only_one = torch.zeros(B, 1, Nq, Nk, dtype=torch.bool, device=DEVICE)
        only_one[0, 0, 0, 0] = True
        run(backend, "batch-train", tensors, stats, attn_mask=only_one)


def test_auto_never_picks_the_interpreter_or_the_emulator_for_cpu_tensors():
    from reattn.backends import Problem, resolve_backend

    assert resolve_backend("auto", Problem(torch.device("cpu"))) in ("eager", "cpu")


@pytest.mark.parametrize("mode", [dict(), dict(masked=True, dropout=True, batchnorm_training=True, norm="batch"),
                                  dict(norm="layer", needs_grad=True, head_dim=64, heads=32)],
                         ids=["plain", "mask+dropout+bn-train", "layer-grad-H32-D64"])
def test_auto_takes_eager_for_cuda_tensors_until_a_gpu_measures_a_fused_backend_faster(mode, monkeypatch):
    # The rule, checked without a GPU: the device queries answer as an H100's (other GPUs:
    # tests/backends/test_gpu_generations.py). A fused backend is picked only where a recorded GPU
    # measurement shows it faster than eager (tests/backends/test_auto.py); none is recorded yet.
    from reattn.backends import Problem, resolve_backend
    from reattn.kernels import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(launch, "device_shared_limit", lambda device: 232448)

    problem_ = Problem(torch.device("cuda"), **dict(dict(heads=12, head_dim=32), **mode))
    assert resolve_backend("auto", problem_) == "eager"
    assert resolve_backend("triton", problem_) == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
def test_auto_runs_eager_on_cuda_tensors_until_measured():
    tensors, stats = problem(2, 6, 17, 17, 32)
    torch.testing.assert_close(run("auto", "layer", tensors, stats), run("eager", "layer", tensors, stats))


def test_triton_backend_updates_running_stats_with_its_op():
    # Training BatchNorm through backend="triton": the running statistics' update is the backend's op
    # (reattn::triton_update_running_stats, one launch of kernels.batchnorm; its schema says it writes both
    # buffers), as the statistics (bn_moments) and the backward's coefficients (bn_coefficients) are launches.
    from reattn.backends.triton import TRITON_KERNELS
    from reattn.kernels import batchnorm

    op = TRITON_OPS.update_running_stats
    assert op is torch.ops.reattn.triton_update_running_stats.default
    assert [a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments] == [
        True, True, False, False]
    assert TRITON_KERNELS.bn_moments is batchnorm.bn_moments
    assert TRITON_KERNELS.bn_coefficients is batchnorm.bn_coefficients
    stats = torch.stack([torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1,
                         torch.full((3,), 50.0, dtype=torch.float64)]).to(DEVICE)
    args = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), stats, 0.1)
    torch.library.opcheck(op, args)


def test_eval_batchnorm_inference_is_one_op_that_folds_the_norm(backend):
    # Eval-mode BatchNorm: without gradients the call is the backend's one op
    # reattn::<backend>_forward_eval_batchnorm (its programs fold the norm from the running statistics); with them
    # the ladder folds it in autograd (torch ops) and runs the norm-none forward op, whose gradients flow through
    # the fold. Same output, within float32's rounding along the op's reduction chains.
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests._tolerance import rounding_bound

    ops = OPS[backend]
    op_name = f"reattn.{backend}_forward_eval_batchnorm"
    assert ops.forward_eval_batchnorm is getattr(torch.ops.reattn, f"{backend}_forward_eval_batchnorm").default
    tensors, _ = problem(2, 6, 9, 9, 16, dtype=torch.float32)
    q, k, v, w, c, gamma, beta = (t.detach() for t in tensors.values())
    stats = dict(running_mean=torch.linspace(-0.02, 0.03, 6, device=DEVICE),
                 running_var=torch.linspace(0.5, 0.9, 6, device=DEVICE))
    kw = dict(norm="batch", norm_weight=gamma, norm_bias=beta, training=False, out_scale=0.8, backend=backend, **stats)
    torch.library.opcheck(ops.forward_eval_batchnorm, (q, k, v, w, c, gamma, beta, stats["running_mean"],
                                                       stats["running_var"], None, 0.25, 0.8, 1e-5))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as inference:
        out = reattn.re_attention(q, k, v, w, c, **kw)
    assert inference.names[0] == op_name and f"reattn.{backend}_forward" not in inference.names
    params = [t.clone().requires_grad_() for t in (q, k, v, w, c, gamma, beta)]
    with Ops() as training:
        graded = reattn.re_attention(*params[:5], **dict(kw, norm_weight=params[5], norm_bias=params[6]))
    assert f"reattn.{backend}_forward" in training.names and op_name not in training.names
    # two float32 computations of one O: each within the accumulation's rounding bound of the exact one
    bound = 2 * rounding_bound(torch.float32, reduction_length(2, 6, 9, 9, 16), out.abs().max().item())
    assert (graded.detach() - out).abs().max().item() <= bound
    graded.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in params)
