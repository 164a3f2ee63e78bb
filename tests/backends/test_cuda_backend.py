"""What is specific to backend="cuda", the CUDA C++ programs of csrc/cuda (the shared correctness suite
of the fused backends is tests/backends/test_fused_backends.py).

Without a GPU, the programs run in their host emulator (the same source, phase by phase). Checked
here: phases do not race (running every phase's items in reverse order changes nothing), the plans
that stage fewer heads or split the head dim give the same answers, the plans of the issue's
shapes fit sm_80 and sm_90 shared memory, the compiled kernels (cuobjdump) spill nothing, and bad
input raises ValueError/TypeError with a readable message. On a GPU: CUDA and Triton agree.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

# The Triton kernels (and the dropout pattern the CUDA programs share with them) need triton, which
# torch's CPU-only wheels do not bring (make install TORCH=cpu): then this module skips, saying so.
pytest.importorskip("triton", reason="triton is not installed (a CPU-only torch)")

import reattn
from reattn._extension import _C
from reattn.backends.cuda import launch_plan
from reattn.kernels.dropout import dropout_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Dynamic shared memory one block may take: the opt-in maximum (A100 166912 B, H100 232448 B)
# minus the 1 KB the compiler reserves in every sm_90 kernel (test_compiled_kernels_... reads it).
SM80_SHARED = 166912
SM90_SHARED = 232448 - 1024
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def tensors(B, H, Nq, Nk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype).to(DEVICE)

    q, k, v = rnd(B, H, Nq, D), rnd(B, H, Nk, D), rnd(B, H, Nk, D)
    w = rnd(H, H, s=0.4) + torch.eye(H, dtype=dtype, device=DEVICE)
    return q, k, v, w, rnd(H, s=0.1), rnd(H, s=0.2, shift=1.0), rnd(H, s=0.1), rnd(B, H, Nq, D)


def run_programs(B, H, Nq, Nk, D, *, norm, masked, dropout, dtype=torch.float64, **options):
    """Every program once (forward, statistics, backward incl. its BatchNorm sums) through reattn._C."""
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, Nq, Nk, D, dtype)
    keep = None
    if masked:
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[0, 0, 0] = False  # a fully masked row
        keep = keep.to(DEVICE)
    seed = torch.tensor([1234], device=DEVICE) if dropout else None
    p = 0.2 if dropout else 0.0
    nw, nb = (gamma, beta) if norm != "none" else (None, None)
    lse, s1, gram = _C.cuda_batch_sums(q, k, keep, seed, 0.4, p, 1.0 / Nk, **{
        n: o for n, o in options.items() if n != "poison_outputs"})
    g = torch.Generator().manual_seed(2)
    stats = torch.stack([torch.rand(H, generator=g, dtype=torch.float64) * 0.1,
                         1 + torch.rand(H, generator=g, dtype=torch.float64)]).to(DEVICE)
    out, lse2 = _C.cuda_forward(q, k, v, w, c, nw, nb, stats if norm == "batch" else None, keep, seed, None, 0.4, 0.8,
                                norm, 1e-5, p, **options)
    rows = torch.cat([stats, torch.rand(2, H, generator=g, dtype=torch.float64).to(DEVICE) * 0.01]) if norm == "batch" \
        else None
    grads = _C.cuda_backward(grad, q, k, v, w, c, nw, nb, rows, keep, seed, lse2, 0.4, 0.8, norm, 1e-5, p, False,
                             **options)
    sums = _C.cuda_backward(grad, q, k, v, w, c, nw, nb, rows, keep, seed, lse2, 0.4, 0.8, norm, 1e-5, p, True,
                            **options)[5:]
    # One-sweep training BatchNorm's forward: norm none, X V in the accumulation dtype, moments of X.
    x_v, _, moments = _C.cuda_forward(q, k, v, w, c, None, None, None, keep, seed, None, 0.4, 1.0, "none", 1e-5, p,
                                      True, **options)
    return dict(lse=lse, s1=s1, gram=gram, out=out, lse2=lse2, dq=grads[0], dk=grads[1], dv=grads[2], dW=grads[3],
                dc=grads[4], dgamma=grads[5], dbeta=grads[6], sum_dn_xhat=sums[0], sum_dn=sums[1], x_v=x_v,
                moments=moments)


def assert_all_close(a, b, rtol, atol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name, equal_nan=False)


CASES = [("none", False, False), ("layer", True, True), ("batch", True, False), ("batch", False, True)]


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the host emulator, which runs on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm,masked,dropout", CASES)
def test_emulated_phases_do_not_race(norm, masked, dropout, dtype):
    # A phase whose items read what other items of the same phase write gives another answer when
    # its items run in the other order (on the GPU it would be a race).
    shape = (2, 5, 19, 23, 35)
    forward = run_programs(*shape, norm=norm, masked=masked, dropout=dropout, dtype=dtype, poison_outputs=True)
    backward = run_programs(*shape, norm=norm, masked=masked, dropout=dropout, dtype=dtype, reverse_items=True,
                            poison_outputs=True)
    for name, t in forward.items():
        assert not t.isnan().any(), name  # poisoned outputs and NaN-filled shared memory never leak
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_all_close(forward, backward, **tol)


@pytest.mark.skipif(DEVICE == "cuda", reason="forces plans through the emulator's shared-memory limit")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("norm,masked,dropout", CASES[1:3])
def test_plans_that_stage_fewer_heads_or_split_the_head_dim_agree(norm, masked, dropout, dtype):
    B, H, Nq, Nk, D = 2, 6, 21, 18, 40
    name = str(dtype).replace("torch.", "")
    unlimited = 1 << 22  # the emulator is not bound by a GPU's shared memory
    roomy = {kind: _C.cuda_plan(kind, H, D, Nq, name, unlimited) for kind in range(4)}
    assert all(p["head_group"] == H and p["num_chunks"] == 1 for p in roomy.values()), roomy
    # Ever smaller limits: fewer heads staged at a time, the head dim in chunks, and (fp16) CUDA-core
    # products on smaller tiles. One run per distinct backward plan.
    plans = {}
    for percent in range(98, 10, -4):
        limit = roomy[2]["shared_bytes"] * percent // 100
        try:
            plan = _C.cuda_plan(2, H, D, Nq, name, limit)
        except ValueError:
            break
        plans.setdefault(tuple(sorted(plan.items())), limit)
    features = [dict(p) for p in plans]
    assert any(p["head_group"] < H for p in features), features
    assert any(p["num_chunks"] > 1 for p in features), features
    if dtype == torch.float16:
        assert {p["pad"] for p in features} == {1, 16}, features
    reference = run_programs(B, H, Nq, Nk, D, norm=norm, masked=masked, dropout=dropout, dtype=dtype,
                             shared_limit=unlimited)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for limit in plans.values():
        got = run_programs(B, H, Nq, Nk, D, norm=norm, masked=masked, dropout=dropout, dtype=dtype,
                           shared_limit=limit)
        assert_all_close(got, reference, **tol)


ISSUE_SHAPES = {"DeiT-S": (6, 64, 197), "DeepViT-16b": (12, 32, 197), "DeepViT-L": (12, 35, 577),
                "H16-D128-N4096": (16, 128, 4096)}


@pytest.mark.parametrize("shape", ISSUE_SHAPES.values(), ids=ISSUE_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["forward", "batch_stats", "backward", "backward_stats"])
def test_plans_of_the_issue_shapes_fit_sm80_and_sm90(shape, dtype, kind):
    H, D, N = shape
    for limit in (SM80_SHARED, SM90_SHARED):
        plan = launch_plan(kind, H, D, N, dtype, limit)
        assert plan["shared_bytes"] <= limit
        assert plan["threads"] == 128
        if dtype in (torch.float16, torch.bfloat16):
            assert plan["pad"] == 16, plan  # the products stay on tensor cores
        if D <= 64 and dtype != torch.float64:
            assert plan["num_chunks"] == 1, plan  # the ViT shapes never repeat the score work


def test_every_head_count_and_head_dim_has_a_plan_on_sm80():
    # 1..32 heads, head dims up to 128: the plan falls back to smaller CUDA-core tiles rather than refuse.
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for kind in range(4):
            for H in (1, 2, 6, 12, 16, 17, 24, 32):
                for D in (1, 16, 33, 35, 64, 96, 128):
                    assert _C.cuda_plan(kind, H, D, 197, dtype, SM80_SHARED)["shared_bytes"] <= SM80_SHARED


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (bundled, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.mark.skipif(not _C.build_info()["cuda"], reason="reattn._C was built without CUDA (CPU-only torch)")
def test_compiled_kernels_spill_nothing_and_reserve_at_most_1kb_of_shared_memory():
    tool = _cuobjdump()
    assert tool is not None, "no cuobjdump: it ships in the triton wheel (triton/backends/nvidia/bin)"
    dump = subprocess.run([tool, "--dump-resource-usage", _C.__file__], check=True, capture_output=True,
                          text=True).stdout
    kernels = {}  # (arch, function) -> resource usage
    arch = function = None
    for line in dump.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            function = match.group(1)
        elif "REG:" in line and function is not None and "re_attention_kernel" in function:
            kernels[(arch, function)] = {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    archs = sorted({a for a, _ in kernels})
    assert {"sm_80", "sm_90"} <= set(archs), archs
    # 4 storage types x 4 programs per architecture
    assert all(sum(1 for a, _ in kernels if a == arch) == 16 for arch in archs), sorted(kernels)
    for (arch, name), usage in kernels.items():
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, name, usage)  # no spills, no local arrays
        assert usage["REG"] <= 255, (arch, name, usage)
        # The tiles are dynamic shared memory sized by the plan (test_plans_of_the_issue_shapes_fit_sm80_and_sm90);
        # static: nothing on sm_80, the compiler's 1 KB reservation on sm_90 (the plan leaves room for it).
        assert usage["SHARED"] <= (1024 if arch == "sm_90" else 0), (arch, name, usage)


def test_bad_input_raises_value_and_type_errors_naming_the_argument():
    q, k, v, w, c, _, _, _ = tensors(2, 3, 5, 7, 8)

    def forward(**override):
        args = dict(q=q, k=k, v=v, mix_weight=w, mix_bias=c, norm_weight=None, norm_bias=None, batch_stats=None,
                    attn_mask=None, seed=None, lse=None, scale=0.3, out_scale=1.0, norm="none", eps=1e-5,
                    dropout_p=0.0)
        args.update(override)
        return _C.cuda_forward(**args)

    with pytest.raises(ValueError, match=r"q must be \[B, H, Nq, D\]"):
        forward(q=q[0])
    with pytest.raises(ValueError, match="must agree on B, H and D"):
        forward(k=k[:, :2])
    with pytest.raises(ValueError, match="v .* must have the shape of k"):
        forward(v=v[:, :, :3])
    with pytest.raises(TypeError, match="k is Float but q is Double"):
        forward(k=k.float())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        forward(q=q.int(), k=k.int(), v=v.int())
    with pytest.raises(ValueError, match=r"mix_weight must have shape \[3, 3\]"):
        forward(mix_weight=w[:2])
    with pytest.raises(ValueError, match="supports 1 to 32 heads"):
        many = torch.zeros(1, 33, 2, 4, dtype=torch.float64, device=DEVICE)
        forward(q=many, k=many, v=many, mix_weight=torch.eye(33, dtype=torch.float64, device=DEVICE), mix_bias=None)
    with pytest.raises(ValueError, match="head dims 1 to 128"):
        wide = torch.zeros(1, 3, 2, 129, dtype=torch.float64, device=DEVICE)
        forward(q=wide, k=wide, v=wide)
    with pytest.raises(ValueError, match="at least one key"):
        forward(k=k[:, :, :0], v=v[:, :, :0])
    with pytest.raises(ValueError, match="does not broadcast"):
        forward(attn_mask=torch.ones(5, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dropout needs seed"):
        forward(dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        forward(dropout_p=1.0, seed=torch.tensor([1], device=DEVICE))
    with pytest.raises(ValueError, match="norm must be 'none', 'layer' or 'batch'"):
        forward(norm="group")
    with pytest.raises(ValueError, match="norm='batch' needs batch_stats"):
        forward(norm="batch")
    with pytest.raises(ValueError, match=r"lse must be a contiguous \[B, H, Nq\]"):
        forward(lse=torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="kind must be one of"):
        launch_plan("sideways", 6, 64, 197, torch.float32)


def test_backend_refuses_cpu_tensors_without_the_emulator(monkeypatch):
    from reattn.backends import Problem, unavailable_reason

    monkeypatch.setenv("REATTN_CUDA_EMULATE", "0")
    reason = unavailable_reason("cuda", Problem(torch.device("cpu")))
    assert reason is not None and "REATTN_CUDA_EMULATE=1" in reason
    q, k, v, w, c, _, _, _ = tensors(1, 2, 3, 3, 4)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
            reattn.re_attention(q, k, v, w, c, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_and_triton_agree_on_a_gpu(dtype):
    B, H, N, D = 4, 12, 197, 32
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, N, N, D, dtype)
    results = {}
    for backend in ("cuda", "triton"):
        args = [t.detach().clone().requires_grad_(True) for t in (q, k, v, w, c, gamma, beta)]
        torch.manual_seed(7)  # the same dropout seed, and Philox stream, for both
        out = reattn.re_attention(*args[:5], norm="layer", norm_weight=args[5], norm_bias=args[6], dropout_p=0.1,
                                  training=True, backend=backend)
        out.backward(grad)
        results[backend] = [out.detach()] + [a.grad for a in args]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for got, expected in zip(results["cuda"], results["triton"]):
        torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
def test_forward_and_backward_capture_in_a_cuda_graph():
    # No host synchronization or host allocation inside the ops: a CUDA graph replays them.
    q, k, v, w, c, gamma, beta, grad = tensors(2, 6, 33, 33, 64, torch.bfloat16)
    seed = torch.tensor([5], device=DEVICE)

    def step():
        out, lse = _C.cuda_forward(q, k, v, w, c, gamma, beta, None, None, seed, None, 0.125, 1.0, "layer", 1e-5,
                                   0.1)
        return [out] + _C.cuda_backward(grad, q, k, v, w, c, gamma, beta, None, None, seed, lse, 0.125, 1.0,
                                        "layer", 1e-5, 0.1, False)[:5]

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (kernel attributes, allocator pools)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    # out and dq are written once per entry: bitwise equal. dk, dv and the parameter gradients are
    # sums of atomic adds, whose order (so the last bits) may differ from run to run.
    for index, (got, want) in enumerate(zip(captured, expected)):
        exact = index in (0, 1)
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-2, atol=0 if exact else 1e-2)


def test_dropout_pattern_is_tritons_philox():
    # Zero queries give uniform P; with V = I (head dim = Nk) the output is A itself, zero where dropped.
    B, H, Nq, Nk = 2, 3, 5, 16
    q = torch.zeros(B, H, Nq, Nk, dtype=torch.float64, device=DEVICE)
    eye = torch.eye(Nk, dtype=torch.float64, device=DEVICE).expand(B, H, Nk, Nk).contiguous()
    w = torch.eye(H, dtype=torch.float64, device=DEVICE)
    seed = torch.tensor([987654321012], device=DEVICE)
    out, _ = _C.cuda_forward(q, eye, eye, w, None, None, None, None, None, seed, None, 1.0, 1.0, "none", 1e-5, 0.3)
    kept = out != 0
    assert 0.5 < kept.double().mean() < 0.9
    torch.testing.assert_close(kept, dropout_keep_mask(seed, (B, H, Nq, Nk), 0.3))
